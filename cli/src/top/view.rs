//! Draws a [`View`] on a ratatui frame: a title line, throughput, tier use, node health.

use kvpool_proto::ByteSize;
use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Gauge, Paragraph, Row, Table},
    Frame,
};

use super::model::View;

pub fn draw(f: &mut Frame, v: &View) {
    let tiers = v.tiers.len().max(1) as u16;
    let [title, top, tier_area, nodes] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(5),
        Constraint::Length(tiers + 2),
        Constraint::Min(3),
    ])
    .areas(f.area());
    f.render_widget(title_line(v), title);
    let [rates, pool] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top);
    f.render_widget(throughput(v), rates);
    f.render_widget(pool_figures(v), pool);
    draw_tiers(f, v, tier_area);
    f.render_widget(node_table(v), nodes);
}

fn title_line(v: &View) -> Paragraph<'static> {
    let mut spans = vec![
        Span::styled("kvpool top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  master {}  refresh {}  (q: quit)",
            v.master, v.refresh
        )),
    ];
    for e in [&v.status_error, &v.metrics_error].into_iter().flatten() {
        spans.push(Span::styled(format!("  {e}"), Style::new().fg(Color::Red)));
    }
    Paragraph::new(Line::from(spans))
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{r:.1}/s"))
}

fn bytes_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{}/s", ByteSize(r as u64)))
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0))
}

fn throughput(v: &View) -> Paragraph<'static> {
    let lines = vec![
        Line::from(format!(
            "lookups {:>12}   hit ratio {:>7} (all {})",
            rate(v.lookups_per_s),
            pct(v.hit_ratio),
            pct(v.hit_ratio_total)
        )),
        Line::from(format!(
            "puts    {:>12}   evictions {:>9}",
            rate(v.puts_per_s),
            rate(v.evictions_per_s)
        )),
        Line::from(format!(
            "in      {:>12}   out {:>15}",
            bytes_rate(v.bytes_in_per_s),
            bytes_rate(v.bytes_out_per_s)
        )),
    ];
    Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(" throughput "))
}

fn pool_figures(v: &View) -> Paragraph<'static> {
    let alive = v.nodes.iter().filter(|n| n.state != "down").count();
    let lines = vec![
        Line::from(format!("objects {}", v.objects)),
        Line::from(format!("puts in progress {}", v.puts_in_progress)),
        Line::from(format!("nodes {} ({alive} alive)", v.nodes.len())),
    ];
    Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(" pool "))
}

fn draw_tiers(f: &mut Frame, v: &View, area: Rect) {
    let block = Block::new().borders(Borders::ALL).title(" tiers ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let rows = Layout::vertical(vec![Constraint::Length(1); v.tiers.len().max(1)]).split(inner);
    for (&(tier, used, cap), row) in v.tiers.iter().zip(rows.iter()) {
        let ratio = if cap == 0 {
            0.0
        } else {
            (used as f64 / cap as f64).clamp(0.0, 1.0)
        };
        let color = if ratio > 0.9 {
            Color::Red
        } else {
            Color::Green
        };
        let gauge = Gauge::default()
            .gauge_style(Style::new().fg(color))
            .ratio(ratio)
            .label(format!(
                "{tier}  {} of {} ({:.1}%)",
                ByteSize(used),
                ByteSize(cap),
                ratio * 100.0
            ));
        f.render_widget(gauge, *row);
    }
}

fn node_table(v: &View) -> Table<'static> {
    let header = Row::new([
        "NAME", "NODE", "ADDRESS", "STATE", "SILENT", "DRAM", "OBJECTS",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = v.nodes.iter().map(|n| {
        let style = match n.state {
            "down" => Style::new().fg(Color::Red),
            "drain" => Style::new().fg(Color::Yellow),
            _ => Style::new(),
        };
        Row::new(vec![
            n.name.clone(),
            n.id.clone(),
            n.addr.clone(),
            n.state.to_string(),
            format!("{:.1}s", n.silent_ms as f64 / 1000.0),
            format!("{} / {}", ByteSize(n.dram.0), ByteSize(n.dram.1)),
            n.objects.to_string(),
        ])
        .style(style)
    });
    Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(17),
            Constraint::Length(22),
            Constraint::Length(5),
            Constraint::Length(7),
            Constraint::Length(20),
            Constraint::Length(8),
        ],
    )
    .header(header)
    .block(Block::new().borders(Borders::ALL).title(" nodes "))
}

#[cfg(test)]
mod tests {
    use kvpool_proto::Tier;
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::top::model::NodeRow;

    #[test]
    fn the_screen_shows_rates_tiers_and_nodes() {
        let v = View {
            refresh: 2,
            master: "127.0.0.1:50051".into(),
            lookups_per_s: Some(1234.5),
            hit_ratio: Some(0.875),
            hit_ratio_total: Some(0.5),
            tiers: vec![(Tier::Dram, 96 << 20, 128 << 20)],
            objects: 42,
            nodes: vec![NodeRow {
                name: "node-a".into(),
                id: "00000000000000aa".into(),
                addr: "10.0.0.1:50052".into(),
                state: "up",
                silent_ms: 300,
                dram: (96 << 20, 128 << 20),
                nvme: (0, 0),
                objects: 42,
            }],
            ..View::default()
        };
        let mut t = Terminal::new(TestBackend::new(80, 20)).unwrap();
        t.draw(|f| draw(f, &v)).unwrap();
        let screen: String = t
            .backend()
            .buffer()
            .content()
            .chunks(80)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        for want in [
            "refresh 2",
            "1234.5/s",
            "87.5%",
            "dram  96MiB of 128MiB (75.0%)",
            "node-a",
            "objects 42",
        ] {
            assert!(screen.contains(want), "{want:?} not on\n{screen}");
        }
    }
}

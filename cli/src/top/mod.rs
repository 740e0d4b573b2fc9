//! `kvpool top`: a live terminal view of the pool, refreshed every second from the master's
//! status (RPC) and its metrics (HTTP). `q`, Esc or Ctrl-C quit; the terminal is restored on
//! every way out (a guard), including an error.

mod model;
mod view;

use std::{
    io::IsTerminal,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use kvpool_client::Client;
use ratatui::{
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    prelude::CrosstermBackend,
    Terminal,
};

use model::Model;

/// Raw mode and the alternate screen, undone when dropped.
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        terminal::enable_raw_mode().context("terminal raw mode")?;
        // From here on the guard exists, so a failure below still restores the terminal.
        let screen = Screen;
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)
            .context("alternate screen")?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = terminal::disable_raw_mode();
    }
}

/// Whether a key asks to quit.
fn quits(e: &Event) -> bool {
    match e {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

/// Waits up to `limit` for input; true when it asks to quit.
async fn wait_for_quit(limit: Duration) -> anyhow::Result<bool> {
    // crossterm's reads block: off the async workers.
    tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !event::poll(left)? {
                return Ok(false);
            }
            if quits(&event::read()?) {
                return Ok(true);
            }
        }
    })
    .await
    .context("input thread")?
    .context("reading the terminal")
}

pub async fn top(
    client: &Client,
    master: String,
    metrics: &str,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!("top needs a terminal; for scripts use `kvpool status --json` or scrape /metrics");
    }
    let started = Instant::now();
    let mut model = Model::new(master);
    let screen = Screen::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout())).context("terminal")?;
    term.clear().context("terminal")?;
    loop {
        let tick = Instant::now();
        let (status, samples) = tokio::join!(
            async {
                tokio::time::timeout(every, client.status())
                    .await
                    .map_err(|_| "status: no answer in time".to_string())?
                    .map_err(|e| format!("status: {e}"))
            },
            scrape(metrics, every)
        );
        model.update(started.elapsed(), status, samples);
        term.draw(|f| view::draw(f, &model.view))
            .context("drawing")?;
        if wait_for_quit(every.saturating_sub(tick.elapsed())).await? {
            break;
        }
    }
    drop(term);
    drop(screen);
    Ok(ExitCode::SUCCESS)
}

async fn scrape(addr: &str, limit: Duration) -> Result<kvpool_ops::scrape::Samples, String> {
    match kvpool_ops::scrape::get(addr, "/metrics", limit).await {
        Ok((200, body)) => Ok(kvpool_ops::scrape::parse(&body)),
        Ok((code, _)) => Err(format!("metrics at {addr}: HTTP {code}")),
        Err(e) => Err(format!("metrics at {addr}: {e}")),
    }
}

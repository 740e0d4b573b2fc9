//! Aligned text tables: every column as wide as its widest cell, numbers on the right.

/// A table under construction.
pub struct Table {
    head: Vec<&'static str>,
    /// Columns aligned right (sizes, counts).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `head`; a name starting with `>` is right-aligned (the `>` is dropped).
    pub fn new(head: &[&'static str]) -> Table {
        Table {
            head: head.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: head.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut width: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = width.get(i).copied().unwrap_or(0);
                if i > 0 {
                    s.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    s.push_str(&format!("{c:>w$}"));
                } else {
                    s.push_str(&format!("{c:<w$}"));
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(self.head.clone());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_numbers_go_right() {
        let mut t = Table::new(&["NAME", ">SIZE"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["longer".into(), "100".into()]);
        assert_eq!(t.render(), "NAME    SIZE\na          1\nlonger   100\n");
    }
}

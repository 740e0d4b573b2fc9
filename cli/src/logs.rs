//! Log output: human text on standard error, with colours only when it is a terminal (a log
//! file or journald gets plain lines, no escape codes), or one JSON object per line
//! (`--log-format json`) for log collectors. `KVPOOL_LOG` takes a full filter
//! (`kvpool_master=debug,info`); without it the level follows `-v` and the verb.

use std::io::IsTerminal;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event: timestamp, level, target, fields (message included).
    Json,
}

pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().with_ansi(false).init(),
    }
}

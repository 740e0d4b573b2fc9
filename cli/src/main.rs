//! `kvpool`: one binary for the whole pool. Servers (`up`, `master`, `store`) and admin verbs
//! (`put`, `get`, `rm`, `exists`, `status`, `drain`, `nodes`, `segments`, `keys`, `inspect`,
//! `top`, `config`). Every verb exits non-zero with a
//! one-line message on failure.

mod admin;
mod cli;
mod config;
mod envcfg;
mod logs;
mod ops;
mod serve;
mod top;
mod verbs;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logs::init(args.log_level(), args.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvpool: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(cli::dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvpool: {e:#}");
            ExitCode::from(2)
        }
    }
}

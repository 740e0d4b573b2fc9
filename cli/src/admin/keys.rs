//! `kvpool keys` (list committed keys by prefix) and `kvpool rm --prefix`.

use std::process::ExitCode;

use anyhow::Context;
use kvpool_client::Client;
use serde_json::json;

use super::{json_key, print_json, show_key};

/// The most keys one `ListKeys` page asks for (the master's cap).
const PAGE: u32 = 10_000;

/// Lists up to `limit` keys starting with `prefix`, paging through the master's answers.
pub async fn keys(
    c: &Client,
    prefix: &str,
    limit: u64,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut more = true;
    while more && (out.len() as u64) < limit {
        let want = (limit - out.len() as u64).min(u64::from(PAGE)) as u32;
        let (page, page_more) = c
            .list_keys(prefix.as_bytes(), out.last().map(Vec::as_slice), want)
            .await
            .context("list keys")?;
        more = page_more;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    // `more` after the last page read: keys past the limit exist.
    let truncated = more;
    if json_out {
        let keys: Vec<_> = out.iter().map(|k| json_key(k)).collect();
        print_json(&json!({ "keys": keys, "more": truncated }));
        return Ok(ExitCode::SUCCESS);
    }
    for k in &out {
        println!("{}", show_key(k));
    }
    if truncated {
        eprintln!("(more keys match; raise --limit to see them)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes every committed key that starts with `prefix` (leased and hard-pinned ones only
/// with `force`): a `RemoveRegex` anchored at the start of the key with the prefix escaped.
pub async fn rm_prefix(
    c: &Client,
    prefix: &str,
    force: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !prefix.is_empty(),
        "rm --prefix: an empty prefix would remove every key; give one"
    );
    let pattern = format!("^{}", regex::escape(prefix));
    let removed = c
        .remove_regex(&pattern, force)
        .await
        .with_context(|| format!("rm --prefix {prefix:?}"))?;
    if json_out {
        print_json(&json!({ "prefix": prefix, "removed": removed }));
    } else {
        println!(
            "removed {removed} key(s) starting with {prefix:?}{}",
            if force {
                ""
            } else {
                " (leased and hard-pinned ones stay without --force)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! Config keys from the environment: `KVPOOL_<SECTION>_<KEY>` sets `section.key`
//! (`KVPOOL_MASTER_LEASE_TTL=20s` is `master.lease-ttl`, `KVPOOL_STORE_NVME_PATH` is
//! `store.nvme.path`). They apply over the file and under the flags. Sans-I/O: the variables
//! are an argument, so precedence and errors are unit-tested without touching the process
//! environment.
//!
//! A value is read as its key's type in the defaults: `true`/`false` for a flag, a number
//! for a number, a comma-separated list for a list (`KVPOOL_MASTER_ETCD=http://a:2379,...`),
//! text otherwise; a bare number for a duration means seconds (`KVPOOL_CLIENT_DEADLINE=1.5`,
//! as the Python package reads it). A key the file would refuse is refused here too, named
//! with the variable it came from.

use anyhow::{anyhow, Context};
use kvpool_proto::HumanDuration;
use toml::{Table, Value};

/// Sections, longest first so that `STORE_NVME_` wins over `STORE_`.
const SECTIONS: [(&str, &[&str]); 4] = [
    ("STORE_NVME_", &["store", "nvme"]),
    ("MASTER_", &["master"]),
    ("STORE_", &["store"]),
    ("CLIENT_", &["client"]),
];

/// The section path and key a variable names, if it is a config variable.
fn target(var: &str) -> Option<(&'static [&'static str], String)> {
    let rest = var.strip_prefix("KVPOOL_")?;
    SECTIONS.iter().find_map(|(prefix, path)| {
        let key = rest.strip_prefix(prefix)?;
        (!key.is_empty()).then(|| (*path, key.to_ascii_lowercase().replace('_', "-")))
    })
}

/// The table at `path` under `root`, created when absent.
fn section<'a>(root: &'a mut Table, path: &[&str]) -> anyhow::Result<&'a mut Table> {
    let mut t = root;
    for p in path {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| anyhow!("`{p}` is not a section"))?;
    }
    Ok(t)
}

/// Reads `raw` as the type of `default` (text when the key has no default).
fn typed(raw: &str, default: Option<&Value>) -> Result<Value, String> {
    let raw = raw.trim();
    Ok(match default {
        Some(Value::Boolean(_)) => Value::Boolean(match raw {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("{raw:?} is not true or false")),
        }),
        Some(Value::Integer(_)) => Value::Integer(
            raw.parse()
                .map_err(|_| format!("{raw:?} is not a whole number"))?,
        ),
        Some(Value::Float(_)) => Value::Float(
            raw.parse()
                .map_err(|_| format!("{raw:?} is not a number"))?,
        ),
        Some(Value::Array(_)) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Some(Value::String(d)) if d.parse::<HumanDuration>().is_ok() => match raw.parse::<f64>() {
            Ok(secs) if secs >= 0.0 && secs.is_finite() => {
                Value::String(format!("{}ms", (secs * 1000.0).round() as u64))
            }
            _ => Value::String(raw.to_string()),
        },
        _ => Value::String(raw.to_string()),
    })
}

/// Applies every config variable in `vars` to `file` (the parsed config file, or an empty
/// table). `defaults` is the default config as TOML, for the keys' types; `check` parses a
/// table as the config and says what is wrong with it.
pub fn overlay(
    file: &mut Table,
    defaults: &Table,
    vars: impl IntoIterator<Item = (String, String)>,
    check: impl Fn(&Table) -> Result<(), String>,
) -> anyhow::Result<()> {
    let mut vars: Vec<_> = vars.into_iter().collect();
    // Deterministic: the same environment always gives the same error first.
    vars.sort();
    for (var, raw) in vars {
        let Some((path, key)) = target(&var) else {
            continue;
        };
        let name = format!("{}.{key}", path.join("."));
        let mut default_path = defaults;
        for p in path {
            default_path = match default_path.get(*p).and_then(Value::as_table) {
                Some(t) => t,
                None => {
                    static EMPTY: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
                    EMPTY.get_or_init(Table::new)
                }
            };
        }
        let value = typed(&raw, default_path.get(&key))
            .map_err(|e| anyhow!("{var} (config key {name}, from the environment): {e}"))?;
        // Alone first, so that a bad value is blamed on its variable and nothing else.
        let mut alone = Table::new();
        section(&mut alone, path)?.insert(key.clone(), value.clone());
        check(&alone)
            .map_err(|e| anyhow!("{var} (config key {name}, from the environment): {e}"))?;
        section(file, path)
            .with_context(|| format!("{var}: the file's {name}"))?
            .insert(key, value);
    }
    Ok(())
}

/// Why `table` is not a valid config file, if it is not.
pub fn check_table<T: serde::de::DeserializeOwned>(table: &Table) -> Result<(), String> {
    match Value::Table(table.clone()).try_into::<T>() {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("unknown field") => {
            Err(format!("no such key ({})", e.to_string().trim()))
        }
        Err(e) => Err(e.to_string().trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn defaults() -> Table {
        toml::from_str(&Config::default_toml()).unwrap()
    }

    fn apply(file: &str, vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut t: Table = toml::from_str(file).unwrap();
        overlay(
            &mut t,
            &defaults(),
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            check_table::<Config>,
        )?;
        Ok(Value::Table(t).try_into()?)
    }

    #[test]
    fn variables_name_keys_and_override_the_file() {
        let c = apply(
            "[master]\nlease-ttl = \"5s\"\nhigh-watermark = 0.5\n",
            &[
                ("KVPOOL_MASTER_LEASE_TTL", "20s"),
                ("KVPOOL_MASTER_ALLOW_EVICT_SOFT_PINNED", "false"),
                ("KVPOOL_MASTER_PROMOTE_AFTER_HITS", "3"),
                ("KVPOOL_MASTER_ETCD", "http://a:2379, http://b:2379"),
                ("KVPOOL_STORE_DRAM", "1GiB"),
                ("KVPOOL_STORE_NAME", "n1"),
                ("KVPOOL_STORE_NVME_PATH", "/data/kv"),
                ("KVPOOL_STORE_NVME_SIZE", "4GiB"),
                ("KVPOOL_CLIENT_DEADLINE", "1.5"),
                ("KVPOOL_MASTER", "10.0.0.1:50051"), // the client flag's variable: not a key
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.master.lease_ttl.0, std::time::Duration::from_secs(20));
        assert_eq!(c.master.high_watermark, 0.5, "the file's value stays");
        assert!(!c.master.allow_evict_soft_pinned);
        assert_eq!(c.master.promote_after_hits, 3);
        assert_eq!(c.master.etcd, vec!["http://a:2379", "http://b:2379"]);
        assert_eq!(c.store.dram.0, 1 << 30);
        assert_eq!(c.store.name.as_deref(), Some("n1"));
        let nvme = c.store.nvme.unwrap();
        assert_eq!(
            (nvme.path.to_str(), nvme.size.0),
            (Some("/data/kv"), 4 << 30)
        );
        assert_eq!(c.client.deadline.0, std::time::Duration::from_millis(1500));
    }

    #[test]
    fn a_bad_value_names_its_variable_and_key() {
        for (var, val, says) in [
            ("KVPOOL_MASTER_LEASE_TTL", "soon", "not a duration"),
            ("KVPOOL_MASTER_HIGH_WATERMARK", "high", "not a number"),
            ("KVPOOL_STORE_HUGE_PAGES", "maybe", "not true or false"),
            ("KVPOOL_MASTER_LEASE_TIME", "10s", "no such key"),
            ("KVPOOL_STORE_DRAM", "lots", "lots"),
        ] {
            let err = apply("", &[(var, val)]).unwrap_err().to_string();
            assert!(
                err.starts_with(var) && err.contains("from the environment") && err.contains(says),
                "{var}={val}: {err}"
            );
        }
    }
}

//! Roles, bootstrap ports and timeouts, from the environment variables vLLM's Mooncake
//! connector reads (so an existing deployment's settings carry over) or kvpool's own.

use std::str::FromStr;
use std::time::Duration;

use kvpool_proto::{HumanDuration, Token};

use super::PdError;

/// Base of the bootstrap ports [8998]: `VLLM_MOONCAKE_BOOTSTRAP_PORT` / `KVPOOL_BOOTSTRAP_PORT`.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;
/// How long a producer holds an unclaimed hand-off [480 s].
pub const DEFAULT_ABORT_TIMEOUT: Duration = Duration::from_secs(480);
/// How long a consumer waits for claim + load + done [60 s]; vLLM's connector has none and
/// leaks decoder memory when a producer dies (vllm-project/vllm#35943).
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a producer renews the read leases of held blocks [3 s]: under a third of the
/// master's lease TTL (10 s default), so one lost renewal never lets a lease lapse.
pub const DEFAULT_HOLD_RENEW: Duration = Duration::from_secs(3);

/// An engine's part in disaggregated serving (vLLM's `kv_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Prefix caching only.
    None,
    /// `kv_producer`: a prefill engine.
    Producer,
    /// `kv_consumer`: a decode engine.
    Consumer,
    /// `kv_both`.
    Both,
}

impl Role {
    pub fn produces(self) -> bool {
        matches!(self, Role::Producer | Role::Both)
    }

    pub fn consumes(self) -> bool {
        matches!(self, Role::Consumer | Role::Both)
    }
}

impl FromStr for Role {
    type Err = PdError;
    fn from_str(s: &str) -> Result<Self, PdError> {
        match s {
            "none" => Ok(Role::None),
            "kv_producer" => Ok(Role::Producer),
            "kv_consumer" => Ok(Role::Consumer),
            "kv_both" => Ok(Role::Both),
            _ => Err(PdError::Config(format!(
                "unknown role {s:?} (none, kv_producer, kv_consumer, kv_both)"
            ))),
        }
    }
}

/// One engine worker's P/D settings.
#[derive(Debug, Clone)]
pub struct PdConfig {
    pub role: Role,
    /// Address the bootstrap server binds and advertises [127.0.0.1]: set it
    /// (`KVPOOL_BOOTSTRAP_HOST`, or vLLM's `VLLM_HOST_IP`) to this host's address across hosts.
    pub host: String,
    /// Base port; 0 makes every worker take a free port (tests).
    pub base_port: u16,
    pub dp_rank: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
    pub abort_timeout: Duration,
    pub consumer_timeout: Duration,
    pub hold_renew: Duration,
    /// The cluster token, required on the bootstrap port when set.
    pub token: Option<Token>,
}

impl PdConfig {
    /// Defaults for `role` and the worker's ranks.
    pub fn new(role: Role, dp_rank: u32, tp_size: u32, tp_rank: u32) -> Self {
        PdConfig {
            role,
            host: "127.0.0.1".into(),
            base_port: DEFAULT_BOOTSTRAP_PORT,
            dp_rank,
            tp_size,
            tp_rank,
            abort_timeout: DEFAULT_ABORT_TIMEOUT,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            hold_renew: DEFAULT_HOLD_RENEW,
            token: None,
        }
    }

    /// [`Self::new`], then the environment: `KVPOOL_*` wins over `VLLM_MOONCAKE_*` where both
    /// are set. Timeouts take whole seconds (vLLM's form) or human units (`"90s"`, `"8m"`).
    pub fn from_env(role: Role, dp_rank: u32, tp_size: u32, tp_rank: u32) -> Result<Self, PdError> {
        Self::from_lookup(role, dp_rank, tp_size, tp_rank, |k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable source (testable without touching the process
    /// environment).
    pub fn from_lookup(
        role: Role,
        dp_rank: u32,
        tp_size: u32,
        tp_rank: u32,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, PdError> {
        let mut cfg = Self::new(role, dp_rank, tp_size, tp_rank);
        let pick = |names: &[&'static str]| names.iter().find_map(|&n| var(n).map(|v| (n, v)));
        if let Some((name, v)) = pick(&["KVPOOL_BOOTSTRAP_PORT", "VLLM_MOONCAKE_BOOTSTRAP_PORT"]) {
            cfg.base_port = v
                .trim()
                .parse()
                .map_err(|_| PdError::Config(format!("{name}={v:?} is not a port")))?;
        }
        if let Some((name, v)) = pick(&[
            "KVPOOL_ABORT_REQUEST_TIMEOUT",
            "VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT",
        ]) {
            cfg.abort_timeout = parse_duration(name, &v)?;
        }
        if let Some((name, v)) = pick(&["KVPOOL_CONSUMER_TIMEOUT"]) {
            cfg.consumer_timeout = parse_duration(name, &v)?;
        }
        if let Some((_, v)) = pick(&["KVPOOL_BOOTSTRAP_HOST", "VLLM_HOST_IP"]) {
            cfg.host = v;
        }
        if let Some((name, v)) = pick(&["KVPOOL_TOKEN"]) {
            cfg.token = Some(
                Token::from_file_text(&v).map_err(|e| PdError::Config(format!("{name}: {e}")))?,
            );
        }
        cfg.bootstrap_port()?;
        Ok(cfg)
    }

    /// `base + dp_rank * tp_size + tp_rank` (vLLM's rule), so every worker on a host has its
    /// own port; 0 when the base is 0 (a free port).
    pub fn bootstrap_port(&self) -> Result<u16, PdError> {
        if self.base_port == 0 {
            return Ok(0);
        }
        if self.tp_rank >= self.tp_size.max(1) {
            return Err(PdError::Config(format!(
                "tp_rank {} out of range for tp_size {}",
                self.tp_rank, self.tp_size
            )));
        }
        u64::from(self.dp_rank)
            .checked_mul(u64::from(self.tp_size))
            .and_then(|o| o.checked_add(u64::from(self.tp_rank)))
            .and_then(|o| o.checked_add(u64::from(self.base_port)))
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| {
                PdError::Config(format!(
                    "bootstrap port {} + {} * {} + {} is past 65535",
                    self.base_port, self.dp_rank, self.tp_size, self.tp_rank
                ))
            })
    }
}

fn parse_duration(name: &str, v: &str) -> Result<Duration, PdError> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    v.parse::<HumanDuration>()
        .map(|d| d.0)
        .map_err(|e| PdError::Config(format!("{name}={v:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn ports_follow_vllms_rule() {
        let c = PdConfig::from_lookup(Role::Producer, 1, 4, 3, env(&[])).unwrap();
        assert_eq!(c.bootstrap_port().unwrap(), 8998 + 4 + 3);
        // TP ranks of one engine get distinct ports.
        let ports: Vec<u16> = (0..4)
            .map(|r| {
                PdConfig::new(Role::Producer, 0, 4, r)
                    .bootstrap_port()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports, vec![8998, 8999, 9000, 9001]);
        let c = PdConfig::from_lookup(
            Role::Producer,
            0,
            2,
            1,
            env(&[("VLLM_MOONCAKE_BOOTSTRAP_PORT", "7000")]),
        )
        .unwrap();
        assert_eq!(c.bootstrap_port().unwrap(), 7001);
    }

    #[test]
    fn kvpool_variables_win_and_units_are_accepted() {
        let c = PdConfig::from_lookup(
            Role::Both,
            0,
            1,
            0,
            env(&[
                ("VLLM_MOONCAKE_BOOTSTRAP_PORT", "7000"),
                ("KVPOOL_BOOTSTRAP_PORT", "9100"),
                ("VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT", "120"),
                ("KVPOOL_CONSUMER_TIMEOUT", "1500ms"),
            ]),
        )
        .unwrap();
        assert_eq!(c.base_port, 9100);
        assert_eq!(c.abort_timeout, Duration::from_secs(120));
        assert_eq!(c.consumer_timeout, Duration::from_millis(1500));
        let d = PdConfig::from_lookup(Role::Both, 0, 1, 0, env(&[])).unwrap();
        assert_eq!(d.abort_timeout, DEFAULT_ABORT_TIMEOUT);
        assert_eq!(d.consumer_timeout, DEFAULT_CONSUMER_TIMEOUT);
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        for vars in [
            [("KVPOOL_BOOTSTRAP_PORT", "eighty")],
            [("KVPOOL_BOOTSTRAP_PORT", "65535")],
            [("KVPOOL_ABORT_REQUEST_TIMEOUT", "soon")],
        ] {
            let e = PdConfig::from_lookup(Role::Producer, 0, 2, 1, env(&vars)).unwrap_err();
            assert!(matches!(e, PdError::Config(_)), "{vars:?}: {e}");
        }
        assert!(PdConfig::new(Role::Producer, 0, 2, 2)
            .bootstrap_port()
            .is_err());
        assert!("kv_sideways".parse::<Role>().is_err());
        assert_eq!("kv_both".parse::<Role>().unwrap(), Role::Both);
    }
}

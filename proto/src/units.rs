//! Human units for sizes and durations ("256MiB", "4GiB", "10s", "480s"), used by every
//! config file and flag.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes that reads and prints with binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        // Whole numbers exactly (an f64 has 53 bits: "9007199254740993B" must not round).
        if let Ok(n) = num.parse::<u64>() {
            return n
                .checked_mul(mult)
                .map(ByteSize)
                .ok_or_else(|| format!("size out of range: {s:?}"));
        }
        let n: f64 = num
            .parse()
            .map_err(|_| format!("not a size: {s:?} (example: 256MiB)"))?;
        let bytes = n * mult as f64;
        if !(0.0..=u64::MAX as f64).contains(&bytes) {
            return Err(format!("size out of range: {s:?}"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, m) in UNITS {
            if self.0 >= m {
                if self.0.is_multiple_of(m) {
                    return write!(f, "{}{name}", self.0 / m);
                }
                return write!(f, "{:.1}{name}", self.0 as f64 / m as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl ByteSize {
    /// The exact form a config file gets: the largest binary unit that divides the size, else
    /// bytes. `Display` rounds to one decimal for people; a written config must read back as
    /// the same size (found by the `store_config` fuzz target: "0.56MiB" came back 41 bytes
    /// smaller).
    pub fn exact(&self) -> String {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        UNITS
            .iter()
            .find(|(_, m)| self.0 >= *m && self.0.is_multiple_of(*m))
            .map_or_else(
                || format!("{}B", self.0),
                |(name, m)| format!("{}{name}", self.0 / m),
            )
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.exact())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration that reads and prints as "10s", "30min", "480s".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("not a duration: {s:?} ({e}; example: 10s, 30min)"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("4GiB".parse::<ByteSize>().unwrap(), ByteSize(4 << 30));
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(
            "9007199254740993B".parse::<ByteSize>().unwrap(),
            ByteSize(9_007_199_254_740_993)
        );
        assert!("18446744073709551615KiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn written_sizes_read_back_exactly() {
        for n in [0, 1, 1023, 1024, 587_202, 3 << 20, (1 << 40) + 1, u64::MAX] {
            let b = ByteSize(n);
            assert_eq!(b.exact().parse::<ByteSize>().unwrap(), b, "{}", b.exact());
        }
        assert_eq!(ByteSize(587_202).exact(), "587202B");
        assert_eq!(ByteSize(3 << 20).exact(), "3MiB");
        assert_eq!(ByteSize(587_202).to_string(), "573.4KiB");
    }

    #[test]
    fn durations() {
        assert_eq!(
            "10s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(10)
        );
        assert_eq!(
            "30min".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(1800)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }
}

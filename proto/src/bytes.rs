//! Byte strings (keys, prefixes, tokens) in message bodies: encoded as postcard encodes any
//! `Vec<u8>` (a varint length, then the bytes, so the wire is unchanged), but decoded with
//! one copy instead of one visit per byte, which made request decoding a visible part of
//! the master's cost per key (`docs/benchmarks.md`, "Master per-key cost"). Used through
//! `#[serde(with = "...")]` on the fields: `serde_bytes` for `Vec<u8>` and `Option<Vec<u8>>`,
//! [`many`] for `Vec<Vec<u8>>`, which `serde_bytes` does not cover.

use serde::{de, Deserializer, Serializer};

/// A list of byte strings.
pub mod many {
    use super::*;
    use serde::ser::SerializeSeq;
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(Bytes::new(b))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        struct Seq;
        impl<'de> de::Visitor<'de> for Seq {
            type Value = Vec<Vec<u8>>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of byte strings")
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The count comes from the peer: reserve only what a small body could hold;
                // each element read is bounded by the body itself.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(b) = seq.next_element::<ByteBuf>()? {
                    out.push(b.into_vec());
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Seq)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        one: Vec<u8>,
        many: Vec<Vec<u8>>,
        opt: Option<Vec<u8>>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fast {
        #[serde(with = "serde_bytes")]
        one: Vec<u8>,
        #[serde(with = "super::many")]
        many: Vec<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        opt: Option<Vec<u8>>,
    }

    proptest! {
        // The wire is what a plain `Vec<u8>` gives: either side may be older.
        #[test]
        fn byte_strings_keep_the_plain_encoding(
            one in proptest::collection::vec(any::<u8>(), 0..300),
            many in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
            opt in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
        ) {
            let plain = Plain { one: one.clone(), many: many.clone(), opt: opt.clone() };
            let fast = Fast { one, many, opt };
            let wire = postcard::to_allocvec(&plain).unwrap();
            prop_assert_eq!(&postcard::to_allocvec(&fast).unwrap(), &wire);
            prop_assert_eq!(postcard::from_bytes::<Fast>(&wire).unwrap(), fast);
        }
    }

    #[test]
    fn a_list_longer_than_its_body_is_refused_without_reserving_it() {
        // A count of 2^32 keys in a 6-byte body.
        let wire = [0x80, 0x80, 0x80, 0x80, 0x10, 0x01];
        #[derive(Debug, Deserialize)]
        struct Keys {
            #[serde(with = "super::many")]
            _keys: Vec<Vec<u8>>,
        }
        assert!(postcard::from_bytes::<Keys>(&wire).is_err());
    }
}

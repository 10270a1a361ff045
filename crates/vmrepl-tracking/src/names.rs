//! Bitmap, job and staging names.

use crate::TrackingError;
use std::fmt;

/// The first 8 hex characters of a relationship UUID: the part of every bitmap, job and
/// staging name that says which relationship owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelTag([u8; 8]);

impl RelTag {
    /// The tag of relationship `id`.
    pub fn from_uuid(id: &uuid::Uuid) -> RelTag {
        let s = id.simple().to_string();
        let mut b = [0u8; 8];
        b.copy_from_slice(&s.as_bytes()[..8]);
        RelTag(b)
    }

    /// Parses 8 lowercase hex characters.
    pub fn parse(s: &str) -> Result<RelTag, TrackingError> {
        let ok = s.len() == 8
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        if !ok {
            return Err(TrackingError::BadName {
                name: s.to_string(),
                why: "a relationship tag is 8 lowercase hex characters (the start of the relationship's UUID)",
            });
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(s.as_bytes());
        Ok(RelTag(b))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("????????")
    }

    /// Job id of the backup of `node` in cycle `seq`: `bk-<relid8>-<seq>-<node>`.
    pub fn job_id(&self, seq: u64, node: &str) -> String {
        format!("bk-{self}-{seq}-{node}")
    }

    /// Prefix of every job id of this relationship.
    pub fn job_prefix(&self) -> String {
        format!("bk-{self}-")
    }

    /// Id of the NBD export of `node` in pull mode: `exp-<relid8>-<node>`.
    pub fn export_id(&self, node: &str) -> String {
        format!("exp-{self}-{node}")
    }

    /// Prefix of every export id of this relationship.
    pub fn export_prefix(&self) -> String {
        format!("exp-{self}-")
    }

    /// Node name of the staging target for `node`: `stg-<relid8>-<node>`.
    pub fn staging_node(&self, node: &str) -> String {
        format!("stg-{self}-{node}")
    }

    /// Prefix of every staging node name of this relationship (file nodes add `-file`).
    pub fn staging_prefix(&self) -> String {
        format!("stg-{self}-")
    }

    /// File name of the staging image of `node` in cycle `seq`: `<relid8>-<seq>-<node>.qcow2`.
    pub fn staging_file(&self, seq: u64, node: &str) -> String {
        format!("{self}-{seq}-{node}.qcow2")
    }
}

impl fmt::Display for RelTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&uuid::Uuid> for RelTag {
    fn from(id: &uuid::Uuid) -> Self {
        RelTag::from_uuid(id)
    }
}

/// A bitmap name owned by a relationship: `vmrepl-<relid8>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitmapName {
    pub rel: RelTag,
    pub seq: u64,
}

impl BitmapName {
    pub const PREFIX: &'static str = "vmrepl-";

    pub fn new(rel: RelTag, seq: u64) -> BitmapName {
        BitmapName { rel, seq }
    }

    /// Parses `vmrepl-<relid8>-<seq>`; `seq` is decimal without leading zeros.
    pub fn parse(s: &str) -> Result<BitmapName, TrackingError> {
        let bad = |why| TrackingError::BadName {
            name: s.to_string(),
            why,
        };
        let rest = s
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| bad("a vmrepl bitmap name starts with \"vmrepl-\""))?;
        let (rel, seq) = rest
            .split_once('-')
            .ok_or_else(|| bad("a vmrepl bitmap name is vmrepl-<relid8>-<seq>"))?;
        let rel = RelTag::parse(rel)?;
        let canonical = !seq.is_empty()
            && seq.bytes().all(|c| c.is_ascii_digit())
            && (seq == "0" || !seq.starts_with('0'));
        if !canonical {
            return Err(bad(
                "the sequence of a vmrepl bitmap name is a decimal number without leading zeros",
            ));
        }
        let seq = seq
            .parse()
            .map_err(|_| bad("the sequence of a vmrepl bitmap name must fit in 64 bits"))?;
        Ok(BitmapName { rel, seq })
    }
}

impl fmt::Display for BitmapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}-{}", Self::PREFIX, self.rel, self.seq)
    }
}

impl std::str::FromStr for BitmapName {
    type Err = TrackingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BitmapName::parse(s)
    }
}

/// QEMU's node-name limit (the name must fit in 32 bytes with its NUL).
pub(crate) const MAX_NODE_NAME: usize = 31;

pub(crate) fn check_node_name(name: &str) -> Result<(), TrackingError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
    if ok {
        Ok(())
    } else {
        Err(TrackingError::BadName {
            name: name.to_string(),
            why: "QEMU node names are at most 31 characters: a letter, then letters, digits, '-', '_' or '.'; use a shorter disk id",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_garbage() {
        let id = uuid::Uuid::parse_str("1234abcd-0000-4000-8000-000000000000").unwrap();
        let rel = RelTag::from_uuid(&id);
        assert_eq!(rel.as_str(), "1234abcd");
        let n = BitmapName::new(rel, 42);
        assert_eq!(n.to_string(), "vmrepl-1234abcd-42");
        assert_eq!(BitmapName::parse("vmrepl-1234abcd-42").unwrap(), n);
        assert_eq!(
            BitmapName::parse(&BitmapName::new(rel, u64::MAX).to_string())
                .unwrap()
                .seq,
            u64::MAX
        );
        for bad in [
            "repl-0",
            "vmrepl-1234abcd",
            "vmrepl-1234abcd-",
            "vmrepl-1234ABCD-1",
            "vmrepl-1234abc-1",
            "vmrepl-1234abcd-01",
            "vmrepl-1234abcd-+1",
            "vmrepl-1234abcd-1-2",
            "vmrepl-1234abcd-99999999999999999999",
        ] {
            assert!(BitmapName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(rel.job_id(3, "disk0"), "bk-1234abcd-3-disk0");
        assert_eq!(rel.staging_node("disk0"), "stg-1234abcd-disk0");
        assert_eq!(rel.staging_file(3, "disk0"), "1234abcd-3-disk0.qcow2");
        assert!(check_node_name("disk0").is_ok());
        assert!(check_node_name(&"d".repeat(32)).is_err());
    }
}

//! Validated names for VMs and hosts. A name never becomes a path on its own: folders on disk
//! are keyed by UUID, but names are still checked so that none can smuggle a path in.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest VM name accepted (Hyper-V allows 100; we keep room for the " - Test" suffix).
pub const MAX_VM_NAME: usize = 64;

/// `base` followed by `suffix`, with `base` shortened (at a character boundary, trailing
/// blanks dropped) so that the whole fits in [`MAX_VM_NAME`] bytes: "NAME - Test", "NAME-2".
pub fn with_suffix(base: &str, suffix: &str) -> String {
    let keep = base
        .char_indices()
        .map(|(at, c)| at + c.len_utf8())
        .take_while(|end| end + suffix.len() <= MAX_VM_NAME)
        .last()
        .unwrap_or(0);
    format!("{}{suffix}", base[..keep].trim_end())
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("The name is empty; give a name of 1 to {max} characters.")]
    Empty { max: usize },
    #[error("The name {name:?} is {len} characters long; use at most {max}.")]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("The name {name:?} contains {what}; use letters, digits, space, '-', '_' and '.' only, starting with a letter or digit.")]
    BadCharacter { name: String, what: String },
    #[error("The name {name:?} could be read as a path ({why}); pick a name without '..', '/' or a leading '.'.")]
    PathLike { name: String, why: &'static str },
}

/// A VM name: 1..=64 characters of `[A-Za-z0-9 ._-]`, starting with a letter or digit, never
/// `.` or `..`, no slashes, no trailing space. Such a name is safe as a file name component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Validates `s` as a VM name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        validate_component(s, MAX_VM_NAME)?;
        Ok(Self(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of this VM's test-failover twin, as Hyper-V names it ("NAME - Test").
    pub fn test_twin(&self) -> VmName {
        VmName(format!("{} - Test", self.0))
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VmName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        VmName::new(&s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        VmName::new(s)
    }
}

/// Checks that `s` is safe as a single file-name component and as a display name.
pub fn validate_component(s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { max });
    }
    let len = s.chars().count();
    if len > max {
        return Err(NameError::TooLong {
            name: s.to_string(),
            len,
            max,
        });
    }
    if s == "." || s == ".." || s.contains("..") {
        return Err(NameError::PathLike {
            name: s.to_string(),
            why: "it contains '..'",
        });
    }
    if s.contains('/') || s.contains('\\') {
        return Err(NameError::PathLike {
            name: s.to_string(),
            why: "it contains a slash",
        });
    }
    if s.starts_with('.') {
        return Err(NameError::PathLike {
            name: s.to_string(),
            why: "it starts with '.'",
        });
    }
    for c in s.chars() {
        let ok = c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.');
        if !ok {
            let what = if c.is_control() {
                format!("the control character U+{:04X}", c as u32)
            } else {
                format!("the character {c:?}")
            };
            return Err(NameError::BadCharacter {
                name: s.to_string(),
                what,
            });
        }
    }
    let first = s.chars().next().expect("non-empty");
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadCharacter {
            name: s.to_string(),
            what: format!("the leading character {first:?}"),
        });
    }
    if s.ends_with(' ') {
        return Err(NameError::BadCharacter {
            name: s.to_string(),
            what: "a trailing space".into(),
        });
    }
    Ok(())
}

/// Host names are DNS names: labels of `[a-z0-9-]`, dot-separated, at most 253 characters.
pub fn validate_host_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { max: 253 });
    }
    if s.len() > 253 {
        return Err(NameError::TooLong {
            name: s.into(),
            len: s.len(),
            max: 253,
        });
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(NameError::BadCharacter {
                name: s.into(),
                what: format!(
                    "the label {label:?} (host names are DNS names such as hosta.example.org)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffixed_name_keeps_the_whole_base_where_it_fits_and_is_cut_where_not() {
        assert_eq!(with_suffix("web01", " - Test"), "web01 - Test");
        let long = "a".repeat(60);
        let t = with_suffix(&long, " - Test");
        assert_eq!(t.len(), MAX_VM_NAME);
        assert!(t.ends_with(" - Test") && VmName::new(&t).is_ok());
        // Blanks left at the cut go, and a multi-byte character is never split.
        let spaced = format!("{} x", "b".repeat(55));
        assert_eq!(
            with_suffix(&spaced, "-12345678"),
            format!("{}-12345678", "b".repeat(55))
        );
        let wide = "é".repeat(40);
        assert!(with_suffix(&wide, "-2").len() <= MAX_VM_NAME);
    }

    #[test]
    fn ordinary_names_are_accepted() {
        for n in ["web01", "Web Server 2", "db_primary.v2", "a", "x-y"] {
            VmName::new(n).unwrap();
        }
    }

    #[test]
    fn an_empty_name_is_refused() {
        assert!(matches!(VmName::new(""), Err(NameError::Empty { .. })));
    }

    #[test]
    fn a_name_longer_than_the_limit_is_refused_with_its_length() {
        let long = "a".repeat(65);
        let e = VmName::new(&long).unwrap_err();
        assert!(e.to_string().contains("65 characters"), "{e}");
    }

    #[test]
    fn names_that_try_to_leave_a_folder_are_refused() {
        for n in ["..", "../etc", "a/b", ".hidden", "a..b", "..\\x"] {
            let e = VmName::new(n).unwrap_err();
            assert!(matches!(e, NameError::PathLike { .. }), "{n}: {e}");
        }
    }

    #[test]
    fn control_characters_and_odd_symbols_are_refused() {
        for n in ["a\nb", "a\0", "a;b", "$x", "-lead", "trail "] {
            assert!(VmName::new(n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn the_test_twin_is_named_as_hyper_v_names_it() {
        assert_eq!(
            VmName::new("web").unwrap().test_twin().as_str(),
            "web - Test"
        );
    }

    #[test]
    fn host_names_are_dns_names() {
        validate_host_name("hosta.example.org").unwrap();
        validate_host_name("h1").unwrap();
        assert!(validate_host_name("bad_name").is_err());
        assert!(validate_host_name("a..b").is_err());
        assert!(validate_host_name("-a.b").is_err());
    }

    #[test]
    fn names_deserialize_through_validation() {
        let ok: VmName = serde_json::from_str("\"vm1\"").unwrap();
        assert_eq!(ok.as_str(), "vm1");
        assert!(serde_json::from_str::<VmName>("\"../x\"").is_err());
    }
}

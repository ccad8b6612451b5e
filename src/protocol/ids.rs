//! Identifiers of the client protocol (PROTOCOL.md §1) and their validation.
//!
//! User and device ids: 1-32 chars of `a-z 0-9 _ . -`, starting with a letter or digit.
//! Conversations: `dm:<a>:<b>` with `a <= b` byte-wise, or `g:<id>` for a group.

use std::fmt;

/// Longest user or device id, in bytes (all allowed characters are ASCII).
pub const MAX_ID_LEN: usize = 32;
/// Longest client message id (`send.id`) and request id (`rid`), in chars.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Whether `s` is a valid user id (PROTOCOL.md §1).
pub fn valid_user_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `s` is a valid device id: the same charset as user ids.
pub fn valid_device_id(s: &str) -> bool {
    valid_user_id(s)
}

/// Whether `s` is a valid group id (the part after `g:`): same charset as user ids.
pub fn valid_group_id(s: &str) -> bool {
    valid_user_id(s)
}

/// Whether `s` is a valid client message id or rid: 1-64 chars.
pub fn valid_client_id(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_CLIENT_ID_LEN
}

/// A parsed conversation id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conv {
    /// A direct conversation between two users, stored with `a <= b` byte-wise.
    Dm { a: String, b: String },
    /// A group, by its id (without the `g:` prefix).
    Group(String),
}

impl Conv {
    /// The direct conversation of two users, in either order.
    pub fn dm(x: &str, y: &str) -> Conv {
        if x <= y {
            Conv::Dm { a: x.to_owned(), b: y.to_owned() }
        } else {
            Conv::Dm { a: y.to_owned(), b: x.to_owned() }
        }
    }

    /// Parses `dm:a:b` (requires `a <= b` and valid user ids) or `g:<id>`; `None` when malformed.
    pub fn parse(s: &str) -> Option<Conv> {
        if let Some(rest) = s.strip_prefix("dm:") {
            let (a, b) = rest.split_once(':')?;
            if valid_user_id(a) && valid_user_id(b) && a <= b {
                return Some(Conv::Dm { a: a.to_owned(), b: b.to_owned() });
            }
            None
        } else if let Some(id) = s.strip_prefix("g:") {
            valid_group_id(id).then(|| Conv::Group(id.to_owned()))
        } else {
            None
        }
    }

    /// Parses a `send.to`: a user id (giving the dm with `from`) or `g:<id>`.
    pub fn from_target(from: &str, to: &str) -> Option<Conv> {
        if to.starts_with("g:") {
            Conv::parse(to)
        } else if valid_user_id(to) {
            Some(Conv::dm(from, to))
        } else {
            None
        }
    }

    /// Whether `user` is one of the two users of a dm (always false for a group: ask the group).
    pub fn dm_has(&self, user: &str) -> bool {
        matches!(self, Conv::Dm { a, b } if a == user || b == user)
    }
}

impl fmt::Display for Conv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conv::Dm { a, b } => write!(f, "dm:{a}:{b}"),
            Conv::Group(id) => write!(f, "g:{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        for ok in ["a", "alice", "0day", "a.b-c_d", &"x".repeat(32)] {
            assert!(valid_user_id(ok), "{ok}");
        }
        for bad in ["", "UPPER", "has space", &"x".repeat(33), "-lead", "_lead", ".lead", "ünï", "a:b"] {
            assert!(!valid_user_id(bad), "{bad}");
        }
    }

    #[test]
    fn convs() {
        assert_eq!(Conv::dm("bob", "alice").to_string(), "dm:alice:bob");
        assert_eq!(Conv::parse("dm:alice:bob"), Some(Conv::dm("alice", "bob")));
        assert_eq!(Conv::parse("dm:bob:alice"), None);
        assert_eq!(Conv::parse("dm:a:a"), Some(Conv::dm("a", "a")));
        assert_eq!(Conv::parse("g:abc1"), Some(Conv::Group("abc1".into())));
        assert_eq!(Conv::parse("g:"), None);
        assert_eq!(Conv::parse("x:y"), None);
        assert_eq!(Conv::from_target("bob", "alice"), Some(Conv::dm("alice", "bob")));
        assert_eq!(Conv::from_target("bob", "Alice"), None);
    }
}

//! Secrets held in memory: a bind password never shows in `Debug` output
//! or logs. One type for the operator client's bind and the drivers'
//! `cn=config` credentials.

use std::fmt;

/// A bind password. Its `Debug` prints `Password(***)`; only
/// [`Password::expose`] gives the text, at the call that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// A password given as is.
    pub fn new(pw: impl Into<String>) -> Password {
        Password(pw.into())
    }

    /// The text, to send in a bind.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (an empty simple-bind password is an
    /// unauthenticated bind, RFC 4513 5.1.2).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A DN and its password, for a simple bind.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Credentials {
    /// Who binds.
    pub dn: String,
    /// With what.
    pub password: Password,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shown_by_debug() {
        let c = Credentials {
            dn: "cn=admin,cn=config".into(),
            password: Password::new("hunter2"),
        };
        let shown = format!("{c:?} {:?}", Some(&c));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("cn=admin,cn=config"), "{shown}");
        assert_eq!(c.password.expose(), "hunter2");
    }
}

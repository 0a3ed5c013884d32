//! What the freeze learns from the server itself before each freeze: its
//! backends (`namingContexts`, when none are configured) and whether binds
//! may write (the password policy control in `supportedControl`). The
//! engine asks through [`Discover`], which the proxy implements with its
//! connection to the upstream; the freeze itself does no I/O here.

use futures::future::BoxFuture;

/// What the server says of itself (its root DSE) that a freeze needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerFacts {
    /// `namingContexts` values.
    pub naming_contexts: Vec<String>,
    /// The server lists the password policy control.
    pub password_policy: bool,
}

/// Reads the server's root DSE. An implementation bounds the read with its
/// own deadline: the engine waits for it inside ON.
pub trait Discover: Send + Sync {
    /// The server's facts, or why they could not be read.
    fn server_facts(&self) -> BoxFuture<'_, Result<ServerFacts, String>>;
}

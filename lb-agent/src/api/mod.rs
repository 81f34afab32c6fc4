//! The runtime control API: newline-delimited JSON on a local Unix socket. `proto` holds the
//! messages, `server` the socket and what each request does, `client` `lb-agent ctl`.
pub mod client;
pub mod proto;
pub mod server;

pub use proto::{BackendView, NewBackend, Request, Response, ServiceView, DEFAULT_SOCKET};
pub use server::{handle, serve, Call};

//! kubelet's streaming protocols, as kubectl speaks them: the WebSocket channel protocol of
//! exec and attach, and SPDY/3.1 for port-forward.

pub mod channel;
pub mod query;
pub mod spdy;
mod spdy_dict;

//! The channel protocol of exec and attach over WebSocket (`v5.channel.k8s.io`, and v4 which
//! lacks the close message): every binary message starts with a channel byte — 0 stdin,
//! 1 stdout, 2 stderr, 3 error (one Status JSON at the end), 4 terminal resize — and v5 adds
//! 255 = "close this channel" (`ff 00` is stdin's EOF).

use serde_json::{Value, json};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// The subprotocols served, best first.
pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// A message from the client, decoded.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    Stdin(&'a [u8]),
    /// The client closed its side of a channel (only stdin's matters).
    Close(u8),
    Resize {
        width: u16,
        height: u16,
    },
    /// A message for a channel clients do not write (ignored), or an empty one.
    Other,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("resize message: {0}")]
    Resize(String),
}

/// Decodes one binary message.
pub fn decode(msg: &[u8]) -> Result<Incoming<'_>, Error> {
    let Some((&ch, body)) = msg.split_first() else {
        return Ok(Incoming::Other);
    };
    match ch {
        STDIN => Ok(Incoming::Stdin(body)),
        CLOSE => Ok(body
            .first()
            .map(|c| Incoming::Close(*c))
            .unwrap_or(Incoming::Other)),
        RESIZE => {
            #[derive(serde::Deserialize)]
            struct Size {
                #[serde(rename = "Width")]
                width: u16,
                #[serde(rename = "Height")]
                height: u16,
            }
            let s: Size = serde_json::from_slice(body).map_err(|e| Error::Resize(e.to_string()))?;
            Ok(Incoming::Resize {
                width: s.width,
                height: s.height,
            })
        }
        _ => Ok(Incoming::Other),
    }
}

/// One outgoing message on `ch`.
pub fn frame(ch: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    v
}

/// The Status written on the error channel when the process ended: Success for exit code 0,
/// `NonZeroExitCode` (which kubectl turns into its own exit code) otherwise.
pub fn exit_status(command: &[String], code: u32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// The Status for a stream that could not run at all (kubectl prints its message).
pub fn failure(message: &str) -> Value {
    json!({
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    })
}

/// The subprotocol to answer with, from the client's `Sec-WebSocket-Protocol` offer.
pub fn negotiate<'a>(offer: &str, supported: &[&'a str]) -> Option<&'a str> {
    let offered: Vec<&str> = offer.split(',').map(str::trim).collect();
    supported.iter().copied().find(|p| offered.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_client_messages() {
        assert_eq!(decode(b"\x00ls\n").unwrap(), Incoming::Stdin(b"ls\n"));
        assert_eq!(decode(b"\xff\x00").unwrap(), Incoming::Close(0));
        let mut m = vec![RESIZE];
        m.extend_from_slice(br#"{"Width":132,"Height":43}"#);
        assert_eq!(
            decode(&m).unwrap(),
            Incoming::Resize {
                width: 132,
                height: 43
            }
        );
        let mut bad = vec![RESIZE];
        bad.extend_from_slice(b"{\"Width\":-1}");
        assert!(matches!(decode(&bad), Err(Error::Resize(_))));
        assert_eq!(decode(b"").unwrap(), Incoming::Other);
        assert_eq!(decode(b"\x01x").unwrap(), Incoming::Other);
    }

    #[test]
    fn exit_codes_become_statuses_kubectl_reads() {
        let ok = exit_status(&["true".into()], 0);
        assert_eq!(ok["status"], "Success");
        let bad = exit_status(&["sh".into(), "-c".into(), "exit 3".into()], 3);
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
    }

    #[test]
    fn picks_the_best_offered_protocol() {
        let offer = "v4.channel.k8s.io, v5.channel.k8s.io, channel.k8s.io";
        assert_eq!(negotiate(offer, PROTOCOLS), Some("v5.channel.k8s.io"));
        assert_eq!(
            negotiate("v4.channel.k8s.io", PROTOCOLS),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(negotiate("base64.channel.k8s.io", PROTOCOLS), None);
    }
}

//! Response content negotiation: a client whose `Accept` asks for protobuf first
//! (`application/vnd.kubernetes.protobuf,application/json`, client-go's typed clients) gets its
//! answers in protobuf, watch streams as length-prefixed `WatchEvent` frames. Handlers answer in
//! JSON; this layer re-encodes what they answered. An object with no protobuf form (a custom
//! resource, a discovery document) stays JSON when the client also accepts JSON, and is refused
//! with 406 when it does not, as kube-apiserver does.

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde_json::Value;

use super::handlers::ApiError;
use super::protobuf;

/// What the client's `Accept` asks for.
#[derive(Debug, PartialEq)]
struct Wants {
    /// Protobuf is the first media range named.
    protobuf: bool,
    /// JSON (or anything) is acceptable as well.
    json: bool,
}

fn wants(accept: &str) -> Wants {
    let ranges: Vec<(&str, &str)> = accept
        .split(',')
        .map(|r| {
            let mut it = r.splitn(2, ';');
            (
                it.next().unwrap_or("").trim(),
                it.next().unwrap_or("").trim(),
            )
        })
        .filter(|(t, _)| !t.is_empty())
        .collect();
    let protobuf = ranges
        .first()
        .is_some_and(|(t, params)| *t == protobuf::MEDIA && !params.contains("as="));
    let json = ranges
        .iter()
        .any(|(t, _)| matches!(*t, "application/json" | "application/*" | "*/*"));
    Wants { protobuf, json }
}

/// Marks a response as a watch stream (newline-delimited JSON events): the watch handler
/// decides what is a watch, this layer only frames what it is told is one.
#[derive(Clone, Copy)]
pub struct WatchStream;

/// The layer: re-encodes JSON answers in protobuf for clients that ask for it.
pub async fn negotiate(req: Request, next: Next) -> Response {
    let w = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .map(wants);
    let Some(w @ Wants { protobuf: true, .. }) = w else {
        return next.run(req).await;
    };
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.split(';').next() == Some("application/json"));
    if !json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    if parts.extensions.get::<WatchStream>().is_some() {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(protobuf::WATCH_MEDIA),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from_stream(watch_frames(body)));
    }
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let encoded = serde_json::from_slice::<Value>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| protobuf::encode_object(&v).map_err(|e| e.to_string()));
    match encoded {
        Ok(pb) => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(protobuf::MEDIA),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(pb))
        }
        Err(_) if w.json => Response::from_parts(parts, Body::from(bytes)),
        Err(e) => ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "NotAcceptable",
            format!(
                "the server was unable to respond with a content type that the client supports: {e}"
            ),
        )
        .into_response(),
    }
}

/// Newline-delimited JSON watch events → protobuf frames. An event that cannot be encoded ends
/// the stream with an error (the client watches again), it is never skipped.
fn watch_frames(
    body: Body,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    let state = (body.into_data_stream(), Vec::<u8>::new(), false);
    futures::stream::unfold(state, |(mut data, mut buf, done)| async move {
        if done {
            return None;
        }
        loop {
            if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let frame = serde_json::from_slice::<Value>(&line)
                    .map_err(|e| e.to_string())
                    .and_then(|ev| protobuf::encode_watch_event(&ev).map_err(|e| e.to_string()));
                return Some(match frame {
                    Ok(f) => (Ok(bytes::Bytes::from(f)), (data, buf, false)),
                    Err(e) => {
                        tracing::warn!(error = %e, "a watch event has no protobuf form; ending the watch");
                        (Err(std::io::Error::other(e)), (data, buf, true))
                    }
                });
            }
            match data.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Some((Err(std::io::Error::other(e)), (data, buf, true))),
                None => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        let pb = "application/vnd.kubernetes.protobuf";
        assert_eq!(
            wants(&format!("{pb},application/json")),
            Wants {
                protobuf: true,
                json: true
            }
        );
        assert_eq!(
            wants(pb),
            Wants {
                protobuf: true,
                json: false
            }
        );
        assert_eq!(
            wants(&format!("application/json, {pb}")),
            Wants {
                protobuf: false,
                json: true
            }
        );
        assert_eq!(
            wants(&format!(
                "{pb};as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
            )),
            Wants {
                protobuf: false,
                json: true
            }
        );
        assert_eq!(
            wants("*/*"),
            Wants {
                protobuf: false,
                json: true
            }
        );
    }
}

//! A container's image before it starts, as kubelet's image manager decides: the pull policy
//! (`Always`, `IfNotPresent`, `Never`), a pull shared with the node's other pods, kubelet's
//! events (`Pulling`, `Pulled`, `Failed`, `BackOff`) and waiting reasons (`ErrImagePull`,
//! `ImagePullBackOff`, `ErrImageNeverPull`, `InvalidImageName`).

use super::start::StartFailure;
use super::*;
use crate::agent::images::{PullResult, credentials_for, go_duration};

/// How long a failed pull shows as `ErrImagePull` before the back-off shows.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(1);

impl PodWorker {
    /// The container's image, or why it cannot start yet. A pull this needs is started (or
    /// joined) and the worker hears of its end by message.
    pub(super) async fn image_for(
        &mut self,
        kind: Kind,
        i: usize,
        c: &Container,
    ) -> Result<ImageInfo, StartFailure> {
        let image_ref = c.image.clone().unwrap_or_default();
        if let Err(e) = crate::runtime::pull::parse_reference(&image_ref) {
            let msg = format!(
                "Failed to apply default image tag \"{image_ref}\": couldn't parse image name \"{image_ref}\": {e}"
            );
            self.event(true, "InspectFailed", msg.clone());
            return Err(StartFailure::new("InvalidImageName", msg));
        }
        let policy = crate::kinds::pod::image_pull_policy(c);
        let looked = Instant::now();
        let present = match self.ctx.rt.image_info(&image_ref).await {
            Ok(img) => Some(img),
            Err(crate::runtime::Error::ImageNotFound(_)) => None,
            Err(e) => return Err(StartFailure::new("ErrImagePull", e.to_string())),
        };
        let fresh = std::mem::take(&mut self.rec(kind, i).pull.fresh);
        match (policy, present) {
            (p, Some(img)) if fresh || p != "Always" => {
                if !fresh {
                    self.event(
                        false,
                        "Pulled",
                        format!("Container image \"{image_ref}\" already present on machine"),
                    );
                }
                return Ok(img);
            }
            ("Never", None) => {
                let msg = format!(
                    "Container image \"{image_ref}\" is not present with pull policy of Never"
                );
                self.event(true, "ErrImageNeverPull", msg.clone());
                return Err(StartFailure::new("ErrImageNeverPull", msg));
            }
            _ => {}
        }
        let now = Instant::now();
        let rec = self.rec(kind, i);
        if rec.pull.waiting_since.is_some() {
            return Err(pending());
        }
        if let Some(until) = rec.pull.backing_off(now) {
            let last = rec.pull.last_error.clone();
            self.event(
                false,
                "BackOff",
                format!("Back-off pulling image \"{image_ref}\""),
            );
            return Err(StartFailure {
                reason: "ImagePullBackOff",
                message: format!("Back-off pulling image \"{image_ref}\": {last}"),
                retry: Some(until - now),
            });
        }
        self.start_pull(kind, i, &image_ref, looked).await;
        Err(pending())
    }

    /// Starts (or joins) the pull of `image_ref` for this container, which found it needed at
    /// `looked`; its end comes back as `Msg::ImagePulled`.
    async fn start_pull(&mut self, kind: Kind, i: usize, image_ref: &str, looked: Instant) {
        self.refresh_refs().await;
        let creds = credentials_for(&self.pod, &self.refs.secrets, image_ref);
        self.event(false, "Pulling", format!("Pulling image \"{image_ref}\""));
        self.rec(kind, i).pull.waiting_since = Some(Instant::now());
        let pull = self.ctx.images.pull(image_ref, creds, looked);
        let tx = self.tx.clone();
        let image = image_ref.to_string();
        tokio::spawn(async move {
            let result = pull.await;
            let _ = tx.send(Msg::ImagePulled { image, result });
        });
    }

    /// A pull ended: the containers that waited for it start now, or show why not.
    pub(super) fn on_pulled(&mut self, image: &str, result: &PullResult) {
        let now = Instant::now();
        for kind in [Kind::Init, Kind::App] {
            let n = if kind == Kind::Init {
                self.init.len()
            } else {
                self.app.len()
            };
            for i in 0..n {
                if self.container(kind, i).image.as_deref() != Some(image) {
                    continue;
                }
                let Some(since) = self.rec(kind, i).pull.waiting_since else {
                    continue;
                };
                match result {
                    Ok(done) => {
                        self.event(
                            false,
                            "Pulled",
                            format!(
                                "Successfully pulled image \"{image}\" in {} ({} including waiting). Image size: {} bytes.",
                                go_duration(done.took),
                                go_duration(now - since),
                                done.size
                            ),
                        );
                        let rec = self.rec(kind, i);
                        rec.pull.succeeded();
                        rec.retry_at = None;
                        self.set_wake(now);
                    }
                    Err(e) => {
                        let reason = pull_reason(e);
                        self.event(
                            true,
                            "Failed",
                            format!("Failed to pull image \"{image}\": {reason}"),
                        );
                        self.event(true, "Failed", "Error: ErrImagePull".into());
                        let rec = self.rec(kind, i);
                        rec.pull.failed(now, reason.clone());
                        // ErrImagePull shows until the next sync, which finds the back-off.
                        rec.waiting = Some(("ErrImagePull".into(), reason));
                        rec.retry_at = Some(now + ERR_IMAGE_PULL_SHOWN);
                        self.set_wake(now + ERR_IMAGE_PULL_SHOWN);
                    }
                }
            }
        }
    }
}

/// Waiting for a pull in flight.
fn pending() -> StartFailure {
    StartFailure {
        reason: "",
        message: String::new(),
        retry: None,
    }
}

/// The registry's words for a failed pull (without the runtime's own prefix).
fn pull_reason(e: &crate::runtime::Error) -> String {
    match e {
        crate::runtime::Error::Pull { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

//! The node's registry configuration, in the format k3s users know (`registries.yaml`):
//! `mirrors` (endpoints tried in order, with repository rewrites) and `configs` (credentials and
//! TLS per registry host), and which endpoints a pull of one image tries.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

/// `registries.yaml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Registry name (`docker.io`, `registry.example:5000`, or `*` for every registry) → its
    /// mirrors.
    #[serde(default)]
    pub mirrors: BTreeMap<String, Mirror>,
    /// Registry or endpoint host (`host[:port]`) → credentials and TLS.
    #[serde(default)]
    pub configs: BTreeMap<String, HostConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// URLs tried in order (`https://host[:port][/path]`; `http://` for plain HTTP); the
    /// registry itself is tried last.
    #[serde(default)]
    pub endpoint: Vec<String>,
    /// Regular expression on the repository → its replacement (`$1` …), applied when pulling
    /// through this mirror's endpoints.
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    #[serde(default)]
    pub auth: Option<Auth>,
    #[serde(default)]
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    /// `base64(username:password)`, as in a docker config.
    #[serde(default)]
    pub auth: String,
    /// A bearer token sent as is.
    #[serde(default)]
    pub identity_token: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A registry credential: user and password, or a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    Basic { username: String, password: String },
    Bearer(String),
}

impl Auth {
    /// The credential this entry names (`auth` decoded when user and password are not given).
    pub fn credential(&self) -> Option<Credential> {
        if !self.identity_token.is_empty() {
            return Some(Credential::Bearer(self.identity_token.clone()));
        }
        if !self.username.is_empty() {
            return Some(Credential::Basic {
                username: self.username.clone(),
                password: self.password.clone(),
            });
        }
        decode_auth(&self.auth)
    }
}

/// `base64(user:password)` → the credential (None when empty or malformed).
pub fn decode_auth(auth: &str) -> Option<Credential> {
    use base64::Engine as _;
    if auth.is_empty() {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some(Credential::Basic {
        username: u.into(),
        password: p.into(),
    })
}

/// Errors in the registry configuration, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// One place a pull may fetch an image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` as dialled.
    pub host: String,
    /// Plain HTTP (an `http://` endpoint).
    pub plain_http: bool,
    /// The repository on this endpoint (rewritten for a mirror, with the endpoint's path
    /// prefix).
    pub repository: String,
    /// Whether this is the registry itself rather than a mirror.
    pub is_default: bool,
}

impl Registries {
    /// Reads `registries.yaml`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Read { file, source }),
        };
        Self::parse(&file, &text)
    }

    /// Parses the YAML text of `file`, checking every endpoint URL and rewrite.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            file: file.to_string(),
            reason,
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let r: Registries = serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (name, m) in &r.mirrors {
            for (i, ep) in m.endpoint.iter().enumerate() {
                parse_endpoint(ep)
                    .map_err(|e| invalid(format!("mirrors.{name:?}.endpoint[{i}]: {e}")))?;
            }
            for pattern in m.rewrite.keys() {
                regex_lite::Regex::new(pattern)
                    .map_err(|e| invalid(format!("mirrors.{name:?}.rewrite[{pattern:?}]: {e}")))?;
            }
        }
        for (host, c) in &r.configs {
            if let Some(t) = &c.tls {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return Err(invalid(format!(
                        "configs.{host:?}.tls: cert_file and key_file go together"
                    )));
                }
                if t.cert_file.is_some() {
                    return Err(invalid(format!(
                        "configs.{host:?}.tls.cert_file: client certificates are not supported by \
                         keelson's registry client yet"
                    )));
                }
            }
        }
        Ok(r)
    }

    /// The endpoints a pull of `repository` from `registry` tries, in order: the registry's
    /// mirrors (or the `*` mirrors), then the registry itself.
    pub fn endpoints(&self, registry: &str, repository: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let mirror = self.mirrors.get(registry).or_else(|| self.mirrors.get("*"));
        if let Some(m) = mirror {
            let repo = rewrite(&m.rewrite, repository);
            for ep in &m.endpoint {
                let Ok((plain_http, host, path)) = parse_endpoint(ep) else {
                    continue;
                };
                let repository = if path.is_empty() {
                    repo.clone()
                } else {
                    format!("{path}/{repo}")
                };
                let default = host == registry || (registry == "docker.io" && is_docker_hub(&host));
                out.push(Endpoint {
                    host,
                    plain_http,
                    repository,
                    is_default: default,
                });
            }
        }
        if !out.iter().any(|e| e.is_default) {
            out.push(Endpoint {
                host: if registry == "docker.io" {
                    "registry-1.docker.io".into()
                } else {
                    registry.to_string()
                },
                plain_http: false,
                repository: repository.to_string(),
                is_default: true,
            });
        }
        out
    }

    /// The node's credential for an endpoint: the endpoint host's, else the registry's.
    pub fn credential(&self, host: &str, registry: &str) -> Option<Credential> {
        [host, registry]
            .iter()
            .filter_map(|h| self.configs.get(*h))
            .find_map(|c| c.auth.as_ref().and_then(Auth::credential))
    }

    /// The TLS settings for an endpoint: the endpoint host's, else the registry's.
    pub fn tls(&self, host: &str, registry: &str) -> Option<&Tls> {
        [host, registry]
            .iter()
            .filter_map(|h| self.configs.get(*h))
            .find_map(|c| c.tls.as_ref())
    }
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "registry-1.docker.io" | "index.docker.io"
    )
}

/// The first rewrite whose pattern matches `repository`, applied.
fn rewrite(rules: &BTreeMap<String, String>, repository: &str) -> String {
    for (pattern, replacement) in rules {
        if let Ok(re) = regex_lite::Regex::new(pattern)
            && re.is_match(repository)
        {
            return re.replace(repository, replacement.as_str()).into_owned();
        }
    }
    repository.to_string()
}

/// `http(s)://host[:port][/path]` (or a bare host, HTTPS) → (plain HTTP, host, path).
fn parse_endpoint(ep: &str) -> Result<(bool, String, String), String> {
    let (plain, rest) = if let Some(r) = ep.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = ep.strip_prefix("https://") {
        (false, r)
    } else if ep.contains("://") {
        return Err(format!("{ep:?}: only http:// and https:// endpoints"));
    } else {
        (false, ep)
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(format!("{ep:?}: no host"));
    }
    let path = path.trim_matches('/');
    let path = path.strip_prefix("v2").unwrap_or(path).trim_matches('/');
    Ok((plain, host.to_string(), path.to_string()))
}

/// Credentials from docker config files (`kubernetes.io/dockerconfigjson` and the older
/// `kubernetes.io/dockercfg`), matched to an image as kubelet's keyring does: by host (a
/// leading `*.` matches one label), port, and repository path prefix.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    entries: Vec<(KeyPattern, Credential)>,
}

#[derive(Debug, Clone)]
struct KeyPattern {
    host: String,
    path: String,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerEntry>,
}

#[derive(Deserialize, Default)]
struct DockerEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
}

impl Keyring {
    /// Adds the entries of a docker config (`legacy`: the bare `.dockercfg` map, else
    /// `.dockerconfigjson` with `auths`); `what` names it in errors.
    pub fn add_docker_config(
        &mut self,
        what: &str,
        data: &[u8],
        legacy: bool,
    ) -> Result<(), String> {
        let auths: BTreeMap<String, DockerEntry> = if legacy {
            serde_json::from_slice(data).map_err(|e| format!("{what}: .dockercfg: {e}"))?
        } else {
            serde_json::from_slice::<DockerConfig>(data)
                .map_err(|e| format!("{what}: .dockerconfigjson: {e}"))?
                .auths
        };
        for (key, e) in auths {
            let cred = Auth {
                username: e.username,
                password: e.password,
                auth: e.auth,
                identity_token: e.identity_token,
            }
            .credential();
            if let Some(c) = cred {
                self.entries.push((KeyPattern::parse(&key), c));
            }
        }
        Ok(())
    }

    /// The credentials for `registry`/`repository`, most specific path first.
    pub fn lookup(&self, registry: &str, repository: &str) -> Vec<Credential> {
        let mut hits: Vec<(usize, &Credential)> = self
            .entries
            .iter()
            .filter(|(k, _)| k.matches(registry, repository))
            .map(|(k, c)| (k.path.len(), c))
            .collect();
        hits.sort_by_key(|h| std::cmp::Reverse(h.0));
        let mut out: Vec<Credential> = Vec::new();
        for (_, c) in hits {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl KeyPattern {
    fn parse(key: &str) -> Self {
        let k = key
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let (host, path) = k.split_once('/').unwrap_or((k, ""));
        let path = path.trim_matches('/');
        let path = match path {
            "v1" | "v2" => "",
            p => p,
        };
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            h => h,
        };
        KeyPattern {
            host: host.to_ascii_lowercase(),
            path: path.to_string(),
        }
    }

    fn matches(&self, registry: &str, repository: &str) -> bool {
        let registry = registry.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            Some(suffix) => registry
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => self.host == registry,
        };
        host_ok
            && (self.path.is_empty()
                || repository == self.path
                || repository.starts_with(&format!("{}/", self.path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
mirrors:
  docker.io:
    endpoint:
      - "http://10.1.0.5:5000"
      - "https://mirror.example/cache"
    rewrite:
      "^library/(.*)": "hub/$1"
  "*":
    endpoint: ["https://all.example"]
configs:
  "mirror.example":
    auth: { username: u, password: p }
    tls: { ca_file: /etc/ca.pem }
  "private.example:5443":
    auth: { auth: "dXNlcjpzZWNyZXQ=" }
"#;

    #[test]
    fn mirrors_come_first_with_their_rewrites_then_the_registry() {
        let r = Registries::parse("r.yaml", YAML).unwrap();
        let eps = r.endpoints("docker.io", "library/nginx");
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].host, "10.1.0.5:5000");
        assert!(eps[0].plain_http);
        assert_eq!(eps[0].repository, "hub/nginx");
        assert_eq!(eps[1].repository, "cache/hub/nginx");
        assert!(!eps[1].plain_http);
        assert_eq!(eps[2].host, "registry-1.docker.io");
        assert_eq!(eps[2].repository, "library/nginx");
        assert!(eps[2].is_default);
        // Any other registry goes through the `*` mirror.
        let eps = r.endpoints("quay.io", "a/b");
        assert_eq!(eps[0].host, "all.example");
        assert_eq!(eps[1].host, "quay.io");
        assert_eq!(
            r.credential("mirror.example", "docker.io"),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            r.credential("private.example:5443", "private.example:5443"),
            Some(Credential::Basic {
                username: "user".into(),
                password: "secret".into()
            })
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = Registries::parse("r.yaml", "mirrors:\n  x:\n    endpoint: [\"ftp://h\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.yaml") && e.contains("endpoint[0]"), "{e}");
        let e = Registries::parse("r.yaml", "mirrors:\n  x:\n    rewrite: {\"(\": \"y\"}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rewrite"), "{e}");
        let e = Registries::parse("r.yaml", "mirror: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert!(Registries::parse("r.yaml", "").unwrap().mirrors.is_empty());
    }

    #[test]
    fn docker_config_keys_match_like_kubelets_keyring() {
        let mut k = Keyring::default();
        k.add_docker_config(
            "s",
            br#"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnB3"},
                "reg.example:5000/team":{"username":"t","password":"1"},
                "reg.example:5000":{"username":"all","password":"2"},
                "*.wild.example":{"username":"w","password":"3"}}}"#,
            false,
        )
        .unwrap();
        let user = |c: &Credential| match c {
            Credential::Basic { username, .. } => username.clone(),
            Credential::Bearer(t) => t.clone(),
        };
        let names =
            |reg: &str, repo: &str| k.lookup(reg, repo).iter().map(user).collect::<Vec<_>>();
        assert_eq!(names("docker.io", "library/nginx"), ["hub"]);
        assert_eq!(names("reg.example:5000", "team/app"), ["t", "all"]);
        assert_eq!(names("reg.example:5000", "other/app"), ["all"]);
        assert_eq!(names("reg.example", "team/app"), Vec::<String>::new());
        assert_eq!(names("a.wild.example", "x"), ["w"]);
        assert_eq!(names("a.b.wild.example", "x"), Vec::<String>::new());
        let mut legacy = Keyring::default();
        legacy
            .add_docker_config("s", br#"{"reg.example":{"auth":"dTpw"}}"#, true)
            .unwrap();
        assert_eq!(legacy.lookup("reg.example", "x").len(), 1);
        let e = Keyring::default()
            .add_docker_config("ns/s", b"{", false)
            .unwrap_err();
        assert!(e.contains("ns/s") && e.contains(".dockerconfigjson"), "{e}");
    }
}

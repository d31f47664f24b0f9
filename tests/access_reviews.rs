//! Access and identity reviews with the real kubectl against `keelson server`: `kubectl auth
//! can-i` (and `--list`) for an administrator, a node and a service account, `--as` /
//! `--as-group` impersonation (allowed for administrators, refused to a service account
//! without the `impersonate` verb), `kubectl auth whoami`, TokenReview with audiences,
//! SubjectAccessReview and LocalSubjectAccessReview bodies and their validation.
mod common;

use std::process::Output;

use common::{Kubectl, Server};

/// A server with service account `default/reader`, which may get and list pods in `default`,
/// and a Group `dev` that may list ConfigMaps there.
struct Fixture {
    s: Server,
    /// `--token=…` of the service account.
    reader: String,
}

impl Fixture {
    fn as_reader(&self, args: &[&str]) -> Output {
        let mut a = vec![self.reader.as_str()];
        a.extend_from_slice(args);
        self.s.kubectl(&a)
    }

    /// `kubectl auth can-i ARGS` (as `prefix`, e.g. `--as=…`): its answer word.
    fn can_i(&self, prefix: &[&str], args: &[&str]) -> String {
        let mut a = prefix.to_vec();
        a.extend(["auth", "can-i"]);
        a.extend_from_slice(args);
        let o = self.s.kubectl(&a);
        let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        // kubectl exits 1 on "no": the answer is what it printed.
        assert!(
            out == "yes" || out.starts_with("no"),
            "kubectl {a:?}: {out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// Creates the review in `json` as the administrator; the answer.
    fn review(&self, file: &str, json: serde_json::Value) -> serde_json::Value {
        let f = self.s.write(file, &json.to_string());
        let out = self.s.ok(&["create", "-f", &f, "-o", "json"]);
        serde_json::from_str(&out).expect("a review answer is JSON")
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn access_and_identity_reviews() {
    let s = Server::start(&[]);
    s.ok(&[
        "create",
        "-f",
        &s.write(
            "rbac.yaml",
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: default}
rules: [{apiGroups: [""], resources: [pods], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: default}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm-reader, namespace: default}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: dev, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: dev}]
"#,
        ),
    ]);
    let reader = format!("--token={}", s.sa_token("reader", &[]));
    let f = Fixture { s, reader };
    crate::scenarios!(&f;
        an_administrator_may_do_anything,
        a_service_account_may_do_what_its_roles_grant,
        a_service_account_lists_its_rules,
        a_node_may_what_the_node_authorizer_allows,
        an_administrator_acts_as_another_user,
        impersonation_needs_the_impersonate_verb,
        whoami_names_the_caller,
        a_token_review_checks_the_token_and_its_audience,
        subject_access_reviews_answer_for_another_user,
    );
}

fn an_administrator_may_do_anything(f: &Fixture) {
    assert_eq!(f.can_i(&[], &["create", "pods"]), "yes");
    assert_eq!(f.can_i(&[], &["*", "*"]), "yes");
    assert_eq!(
        f.can_i(&[], &["get", "/healthz"]),
        "yes",
        "non-resource URLs too"
    );
}

fn a_service_account_may_do_what_its_roles_grant(f: &Fixture) {
    let r = f.reader.as_str();
    assert_eq!(f.can_i(&[r], &["list", "pods"]), "yes");
    assert_eq!(f.can_i(&[r], &["get", "pods/web"]), "yes");
    assert!(f.can_i(&[r], &["delete", "pods"]).starts_with("no"));
    assert!(
        f.can_i(&[r], &["list", "pods", "-n", "kube-system"])
            .starts_with("no")
    );
    assert!(f.can_i(&[r], &["list", "secrets"]).starts_with("no"));
    // What every user may (kube-apiserver's system:discovery and system:basic-user).
    assert_eq!(f.can_i(&[r], &["get", "/apis/apps"]), "yes");
    assert!(f.can_i(&[r], &["get", "/metrics"]).starts_with("no"));
    // And what it is refused, it is refused for real.
    let o = f.as_reader(&["get", "secrets"]);
    assert!(
        stderr(&o).contains(
            "User \"system:serviceaccount:default:reader\" cannot list resource \"secrets\""
        ),
        "{}",
        stderr(&o)
    );
}

fn a_service_account_lists_its_rules(f: &Fixture) {
    let o = f.as_reader(&["auth", "can-i", "--list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    let row = |resource: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(resource))
            .map(|l| l.to_string())
            .unwrap_or_default()
    };
    assert!(row("pods").contains("[get list]"), "{table}");
    assert!(
        row("selfsubjectaccessreviews.authorization.k8s.io").contains("[create]"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("[/api/*]") && l.contains("[get]")),
        "{table}"
    );
    assert!(row("secrets").is_empty(), "{table}");
    // Another namespace: no pods there.
    let o = f.as_reader(&["auth", "can-i", "--list", "-n", "kube-system"]);
    let other = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!other.lines().any(|l| l.starts_with("pods ")), "{other}");
}

fn a_node_may_what_the_node_authorizer_allows(f: &Fixture) {
    let node = ["--as=system:node:n1", "--as-group=system:nodes"];
    assert_eq!(f.can_i(&node, &["get", "nodes"]), "yes");
    assert_eq!(f.can_i(&node, &["list", "pods", "-A"]), "yes");
    assert!(f.can_i(&node, &["create", "namespaces"]).starts_with("no"));
    assert!(f.can_i(&node, &["list", "secrets", "-A"]).starts_with("no"));
    // The answer says why (the Node authorizer's reason).
    let a = f.review(
        "node-sar.json",
        serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "system:node:n1", "groups": ["system:nodes"],
                     "resourceAttributes": {"verb": "update", "resource": "nodes", "name": "n2"}}}),
    );
    assert_eq!(a["status"]["allowed"], false, "{a}");
    assert!(
        a["status"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("is not allowed to modify node \"n2\""),
        "{a}"
    );
    // It may list nothing: kube's Node authorizer resolves no rules.
    let o = f.s.kubectl(&["auth", "can-i", "--list", node[0], node[1]]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &stderr(&o);
    assert!(
        out.contains("node authorizer does not support user rule resolution"),
        "{out}"
    );
}

fn an_administrator_acts_as_another_user(f: &Fixture) {
    let sa = "--as=system:serviceaccount:default:reader";
    assert_eq!(f.can_i(&[sa], &["list", "pods"]), "yes");
    assert!(f.can_i(&[sa], &["delete", "pods"]).starts_with("no"));
    // A plain user: its groups decide.
    let o =
        f.s.kubectl(&["--as=jane", "--as-group=dev", "get", "configmaps"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = f.s.kubectl(&["--as=jane", "get", "configmaps"]);
    assert!(
        stderr(&o).contains("User \"jane\" cannot list resource \"configmaps\""),
        "{}",
        stderr(&o)
    );
}

fn impersonation_needs_the_impersonate_verb(f: &Fixture) {
    let o = f.as_reader(&["--as=jane", "get", "pods"]);
    assert!(
        stderr(&o).contains(
            "users \"jane\" is forbidden: User \"system:serviceaccount:default:reader\" cannot impersonate resource \"users\""
        ),
        "{}",
        stderr(&o)
    );
    // Granted the verb for that user alone, it may.
    f.s.ok(&[
        "create",
        "-f",
        &f.s.write(
            "impersonate.yaml",
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: impersonate-jane}
rules: [{apiGroups: [""], resources: [users], verbs: [impersonate], resourceNames: [jane]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader-impersonates-jane}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: impersonate-jane}
subjects: [{kind: ServiceAccount, name: reader, namespace: default}]
"#,
        ),
    ]);
    let o = f.as_reader(&[
        "--as=jane",
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "jane", "{}", stderr(&o));
    let o = f.as_reader(&["--as=joe", "get", "pods"]);
    assert!(
        stderr(&o).contains("cannot impersonate resource \"users\""),
        "{}",
        stderr(&o)
    );
    let o = f.as_reader(&["--as=jane", "--as-group=system:masters", "get", "secrets"]);
    assert!(
        stderr(&o).contains("cannot impersonate resource \"groups\""),
        "a group it may not take: {}",
        stderr(&o)
    );
}

fn whoami_names_the_caller(f: &Fixture) {
    let table = f.s.ok(&["auth", "whoami"]);
    assert!(table.contains("kubernetes-admin"), "{table}");
    assert!(table.contains("system:masters"), "{table}");
    let o = f.as_reader(&["auth", "whoami", "-o", "json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", stderr(&o)));
    assert_eq!(
        v["status"]["userInfo"]["username"],
        "system:serviceaccount:default:reader"
    );
    let groups = v["status"]["userInfo"]["groups"].to_string();
    assert!(
        groups.contains("system:serviceaccounts:default"),
        "{groups}"
    );
}

fn a_token_review_checks_the_token_and_its_audience(f: &Fixture) {
    let review = |file: &str, token: &str, audiences: &[&str]| {
        f.review(
            file,
            serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences}}),
        )
    };
    let token = f.reader.trim_start_matches("--token=");
    let a = review("tr-api.json", token, &[]);
    assert_eq!(a["status"]["authenticated"], true, "{a}");
    assert_eq!(
        a["status"]["user"]["username"],
        "system:serviceaccount:default:reader"
    );
    let uid =
        f.s.ok(&["get", "sa", "reader", "-o", "jsonpath={.metadata.uid}"]);
    assert_eq!(a["status"]["user"]["uid"], uid.as_str(), "{a}");
    // A token for another audience proves nothing to the API server, and the reverse.
    let vault = f.s.sa_token("reader", &["vault"]);
    let a = review("tr-vault.json", &vault, &["vault"]);
    assert_eq!(a["status"]["authenticated"], true, "{a}");
    assert_eq!(a["status"]["audiences"], serde_json::json!(["vault"]));
    let a = review("tr-vault-api.json", &vault, &[]);
    assert_eq!(a["status"]["authenticated"], false, "{a}");
    assert!(
        a["status"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("audiences"),
        "{a}"
    );
    let a = review("tr-bogus.json", "keelson-sa.bogus", &[]);
    assert_eq!(a["status"]["authenticated"], false, "{a}");
    // A service account may not ask (no create on tokenreviews).
    let f2 = f.s.write(
        "tr-by-sa.json",
        &serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token}})
        .to_string(),
    );
    let o = f.as_reader(&["create", "-f", &f2]);
    assert!(
        stderr(&o).contains("cannot create resource \"tokenreviews\""),
        "{}",
        stderr(&o)
    );
}

fn subject_access_reviews_answer_for_another_user(f: &Fixture) {
    let a = f.review(
        "lsar.json",
        serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "LocalSubjectAccessReview",
            "metadata": {"namespace": "default"},
            "spec": {"user": "system:serviceaccount:default:reader",
                     "resourceAttributes": {"verb": "list", "resource": "pods"}}}),
    );
    assert_eq!(a["status"]["allowed"], true, "{a}");
    assert_eq!(a["spec"]["resourceAttributes"]["namespace"], "default");
    // Bad reviews get kube-apiserver's 422 naming the field.
    let bad = f.s.write(
        "sar-bad.json",
        &serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": "get", "resource": "pods"}}})
        .to_string(),
    );
    let o = f.s.kubectl(&["create", "-f", &bad]);
    assert!(
        stderr(&o).contains("at least one of user or group must be specified"),
        "{}",
        stderr(&o)
    );
    let both = f.s.write(
        "sar-both.json",
        &serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "x", "resourceAttributes": {"verb": "get"},
                     "nonResourceAttributes": {"path": "/", "verb": "get"}}})
        .to_string(),
    );
    let o = f.s.kubectl(&["create", "-f", &both]);
    assert!(stderr(&o).contains("exactly one of"), "{}", stderr(&o));
    // Never stored: nothing to list.
    let o = f.s.kubectl(&["get", "subjectaccessreviews"]);
    assert!(!o.status.success(), "reviews are not listed");
}

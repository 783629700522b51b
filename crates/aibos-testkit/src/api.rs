//! Typed helpers over the kernel's HTTP API for tests: log in, create tenants,
//! users and roles, with the calls a real client would make.

use serde_json::{Value, json};

use crate::TestKernel;

/// The password every test user gets (long enough for the policy).
pub const PASSWORD: &str = "correct horse battery staple";

/// An authenticated client of one kernel.
#[derive(Clone)]
pub struct Session {
    /// The access token.
    pub access_token: String,
    /// The refresh token (users only).
    pub refresh_token: Option<String>,
    /// The tenant id.
    pub tenant_id: String,
    /// The user or service account id.
    pub subject_id: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tenant_id", &self.tenant_id)
            .field("subject_id", &self.subject_id)
            .finish_non_exhaustive()
    }
}

impl TestKernel {
    /// A request builder with the session's bearer token.
    pub fn as_(
        &self,
        session: &Session,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&session.access_token)
    }

    /// Creates the first platform administrator through `POST /api/kernel/bootstrap`
    /// when the kernel has a bootstrap key, else through the offline path, and logs in.
    pub async fn platform_admin(&self) -> Session {
        let pw = aibos_kernel::identity::password::Password::parse(PASSWORD.to_owned())
            .expect("valid password");
        aibos_kernel::identity::admin::create_platform_admin(
            self.state.db(),
            "root@example.com",
            "Root",
            pw,
            self.state.redact_keys(),
        )
        .await
        .expect("create the platform administrator");
        self.login("system", "root@example.com", PASSWORD)
            .await
            .expect("the administrator logs in")
    }

    /// `POST /api/kernel/auth/login`; `Err` carries the status and body.
    pub async fn login(
        &self,
        tenant: &str,
        email: &str,
        password: &str,
    ) -> Result<Session, (u16, Value)> {
        let response = self
            .client
            .post(self.url("/api/kernel/auth/login"))
            .json(&json!({ "tenant": tenant, "email": email, "password": password }))
            .send()
            .await
            .expect("login request");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status != 200 {
            return Err((status, body));
        }
        let access_token = body["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned();
        let me: Value = self
            .client
            .get(self.url("/api/kernel/auth/me"))
            .bearer_auth(&access_token)
            .send()
            .await
            .expect("me")
            .json()
            .await
            .expect("me body");
        Ok(Session {
            access_token,
            refresh_token: body["refresh_token"].as_str().map(str::to_owned),
            tenant_id: me["tenant"]["id"].as_str().unwrap_or_default().to_owned(),
            subject_id: me["subject"]["id"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Creates a tenant and its administrator (as the platform administrator) and logs that administrator in.
    pub async fn tenant_with_admin(&self, platform: &Session, slug: &str) -> Session {
        let tenant: Value = self
            .as_(platform, reqwest::Method::POST, "/api/kernel/tenants")
            .json(&json!({ "slug": slug, "name": slug }))
            .send()
            .await
            .expect("create tenant")
            .json()
            .await
            .expect("tenant body");
        let id = tenant["id"]
            .as_str()
            .unwrap_or_else(|| panic!("tenant created: {tenant}"))
            .to_owned();
        let email = format!("admin@{slug}.example");
        let response = self
            .as_(
                platform,
                reqwest::Method::POST,
                &format!("/api/kernel/tenants/{id}/admins"),
            )
            .json(&json!({ "email": email, "name": "Admin", "password": PASSWORD }))
            .send()
            .await
            .expect("create tenant admin");
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        self.login(slug, &email, PASSWORD)
            .await
            .expect("the tenant administrator logs in")
    }

    /// Creates a user in `admin`'s tenant; returns its id.
    pub async fn user(&self, admin: &Session, email: &str) -> String {
        let response = self
            .as_(admin, reqwest::Method::POST, "/api/kernel/users")
            .json(&json!({ "email": email, "name": email, "password": PASSWORD }))
            .send()
            .await
            .expect("create user");
        let body: Value = response.json().await.expect("user body");
        body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("user created: {body}"))
            .to_owned()
    }

    /// Creates a role in `admin`'s tenant; returns its id.
    pub async fn role(&self, admin: &Session, name: &str, permissions: &[&str]) -> String {
        let body: Value = self
            .as_(admin, reqwest::Method::POST, "/api/kernel/roles")
            .json(&json!({ "name": name, "permissions": permissions }))
            .send()
            .await
            .expect("create role")
            .json()
            .await
            .expect("role body");
        body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("role created: {body}"))
            .to_owned()
    }

    /// Registers a canon at `base_url` (platform administrators); returns its id
    /// and its assertion secret.
    pub async fn canon(
        &self,
        platform: &Session,
        name: &str,
        base_url: &str,
        permissions: &[&str],
    ) -> (String, String) {
        let permissions: Vec<Value> = permissions
            .iter()
            .map(|p| json!({ "name": p, "description": format!("{p} (test)") }))
            .collect();
        let response = self
            .as_(platform, reqwest::Method::POST, "/api/kernel/canons")
            .json(&json!({ "name": name, "base_url": base_url, "permissions": permissions }))
            .send()
            .await
            .expect("create canon");
        assert_eq!(response.status(), 201, "create canon");
        let body: Value = response.json().await.expect("canon body");
        (
            body["id"].as_str().expect("canon id").to_owned(),
            body["assertion_secret"]["secret"]
                .as_str()
                .expect("canon secret")
                .to_owned(),
        )
    }

    /// Adds a route to a canon; returns its id. `extra` fields are merged into the body.
    pub async fn route(
        &self,
        platform: &Session,
        canon_id: &str,
        method: &str,
        path: &str,
        required_permissions: &[&str],
        extra: Value,
    ) -> String {
        let mut body = json!({
            "canon_id": canon_id, "method": method, "path": path, "required_permissions": required_permissions,
        });
        if let (Some(target), Some(more)) = (body.as_object_mut(), extra.as_object()) {
            target.extend(more.clone());
        }
        let response = self
            .as_(platform, reqwest::Method::POST, "/api/kernel/routes")
            .json(&body)
            .send()
            .await
            .expect("create route");
        let status = response.status();
        let body: Value = response.json().await.expect("route body");
        assert_eq!(status, 201, "create route: {body}");
        body["id"].as_str().expect("route id").to_owned()
    }

    /// Assigns a role; asserts 204.
    pub async fn assign(&self, admin: &Session, user_id: &str, role_id: &str) {
        let response = self
            .as_(
                admin,
                reqwest::Method::POST,
                &format!("/api/kernel/users/{user_id}/roles"),
            )
            .json(&json!({ "role_id": role_id }))
            .send()
            .await
            .expect("assign role");
        assert_eq!(response.status(), 204, "{:?}", response.text().await);
    }

    /// The caller's tenant's audit entries matching `query` (e.g. `action=user.created`).
    pub async fn audit(&self, session: &Session, query: &str) -> Vec<Value> {
        let body: Value = self
            .as_(
                session,
                reqwest::Method::GET,
                &format!("/api/kernel/audit?limit=1000&{query}"),
            )
            .send()
            .await
            .expect("audit query")
            .json()
            .await
            .expect("audit body");
        body["items"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("audit items: {body}"))
    }
}

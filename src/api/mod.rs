//! Client dialects. Each module owns its routes, its wire types and the one place where
//! its errors become status codes. They all call the same [`crate::server::Node`], and
//! all admit their requests through the one gate of [`body`] (bodies read under a size
//! limit, a deadline and a memory budget, then a node-wide in-flight limit).

pub mod body;
pub mod kv_store;

use axum::http::HeaderMap;

/// The admin credential a request carries: the token of an `Authorization: Bearer`
/// header (see `Node::authorize_admin`). Any dialect's admin endpoints pass it on.
pub fn admin_credential(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::AUTHORIZATION,
                v.parse().expect("header value"),
            );
            admin_credential(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer s3cret"), Some("s3cret".into()));
        assert_eq!(with("bearer  s3cret "), Some("s3cret".into()));
        assert_eq!(with("Basic dXNlcjpwYXNz"), None);
        assert_eq!(with("s3cret"), None);
        assert_eq!(admin_credential(&HeaderMap::new()), None);
    }
}

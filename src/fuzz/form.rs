//! The `form` target: `/kv-store` form bodies, addresses, bearer credentials.

use super::*;

/// `/kv-store` form bodies and query strings, and the other small texts that come from
/// outside: the `ip_port` field and `VIEW` (addresses) and the `Authorization` header.
/// Every parser gets the whole input.
pub fn form(data: &[u8]) {
    let (parsed, peak) = peak_allocation(|| {
        let mut fields = HashMap::new();
        crate::http::form::parse_form(data, &mut fields).map(|()| fields)
    });
    check_alloc("form", data.len(), peak);
    match (parsed, form_oracle(data)) {
        (Ok(fields), Some(expected)) => {
            decoded();
            assert_eq!(fields, expected, "form fields differ from the oracle's");
            let lossy: HashMap<String, String> = form_urlencoded::parse(data)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(fields, lossy, "form fields differ from form_urlencoded's");
            let decoded: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(decoded <= data.len(), "decoding grew the fields");
        }
        (Err(e), None) => {
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("UTF-8"), "{}", e.message);
        }
        (Ok(fields), None) => panic!("accepted a form with a non-UTF-8 field: {fields:?}"),
        (Err(e), Some(expected)) => panic!("refused a valid form ({e}): {expected:?}"),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        addresses(text);
    }
    bearer(data);
}

/// What the form decodes to, or `None` if a name or value is not UTF-8 once decoded: an
/// oracle written byte by byte from the `application/x-www-form-urlencoded` rules
/// (pairs split at `&`, name and value at the first `=`, `+` a space, `%XX` a byte,
/// any other `%` itself), independent of the parser under test.
pub(super) fn form_oracle(data: &[u8]) -> Option<HashMap<String, String>> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    fn decode(raw: &[u8]) -> Option<String> {
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while let Some(&b) = raw.get(i) {
            let escaped = match (b, raw.get(i + 1), raw.get(i + 2)) {
                (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            match escaped {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(if b == b'+' { b' ' } else { b });
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    }
    let mut fields = HashMap::new();
    for pair in data.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        fields.insert(name, value);
    }
    Some(fields)
}

/// `ip_port` and `VIEW`: an accepted address is normal (parsing it again gives it back),
/// an accepted list has no duplicates and parses back to itself.
pub(super) fn addresses(text: &str) {
    if let Ok(addr) = parse_addr(text) {
        assert!(addr.parse::<SocketAddr>().is_ok(), "{addr:?}");
        assert_eq!(parse_addr(&addr), Ok(addr.clone()), "not normal: {addr:?}");
    }
    if let Ok(list) = parse_view_list(text) {
        assert!(!list.is_empty());
        for (i, m) in list.iter().enumerate() {
            assert!(!list[..i].contains(m), "duplicate {m:?}");
            assert_eq!(parse_addr(m).as_ref(), Ok(m), "not normal: {m:?}");
        }
        assert_eq!(parse_view_list(&list.join(",")), Ok(list));
    }
}

/// The `Authorization` header: a credential is the trimmed rest after `bearer `.
pub(super) fn bearer(data: &[u8]) {
    use axum::http::{header::AUTHORIZATION, HeaderMap, HeaderValue};
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    let Some(token) = crate::api::admin_credential(&headers) else {
        return;
    };
    let text = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    let scheme = text.get(..7).unwrap_or_default();
    assert!(scheme.eq_ignore_ascii_case("bearer "), "{text:?}");
    assert_eq!(token, token.trim());
    assert!(
        text.ends_with(token),
        "{token:?} is not the end of {text:?}"
    );
}

pub(super) fn form_seeds() -> Vec<Vec<u8>> {
    let token = sample_token(3, 2).encode(&token_key());
    let mut seeds: Vec<Vec<u8>> = [
        "",
        "val=hello&causal_payload=",
        "causal_payload=&val=a+b%20c%2Bd",
        "val=caf%C3%A9+%E2%82%AC+%F0%9F%98%80&x=%zz%2",
        "val=%%41%4&&=&a&b=&=c",
        "ip_port=10.0.0.25:8080&type=add",
        "partition_id=1",
        "10.0.0.21:8080,10.0.0.22:8080, 10.0.0.23:8080,",
        " [::1]:8080 ",
        "[fe80::1%25eth0]:80",
        "Bearer s3cret",
        "bearer  tok ",
        "Basic dXNlcjpwYXNz",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    seeds.push(format!("val=v&causal_payload={token}").into_bytes());
    seeds.push(b"val=\xff&causal_payload=".to_vec());
    seeds.push(b"v%FFl=1".to_vec());
    seeds.push(b"val=caf\xc3\xa9&k=%C3".to_vec());
    seeds.push(format!("val={}", "x%41+".repeat(200)).into_bytes());
    seeds
}

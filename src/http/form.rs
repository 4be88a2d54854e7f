//! Form decoding (`application/x-www-form-urlencoded`) for the dialects whose fields
//! come that way (`/kv-store`, in the query string and the body alike).
//!
//! Fields are decoded as `form_urlencoded::parse` decodes them (`+` is a space, `%XX` a
//! byte, malformed escapes are kept as they are), except that a name or value that is
//! not UTF-8 once decoded is refused with 400 naming the field, never stored altered.
//! Written by hand rather than with `form_urlencoded` for that one difference (it
//! replaces invalid UTF-8 with U+FFFD) and for a validate-only fast path.

use std::collections::HashMap;

use crate::error::Error;

/// Longest field name quoted back in an error.
const QUOTED_NAME_CHARS: usize = 64;

/// Adds the pairs of the form-encoded `source` to `fields`, decoded as
/// `form_urlencoded::parse` decodes them (a later pair wins; malformed escapes stay as
/// they are), except that a name or value that is not UTF-8 once decoded is refused
/// (400, naming the field) rather than altered. Public for the fuzz target `fuzz::form`.
pub fn parse_form(source: &[u8], fields: &mut HashMap<String, String>) -> Result<(), Error> {
    for pair in source.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name).ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(name)
                .chars()
                .take(QUOTED_NAME_CHARS)
                .collect();
            Error::bad_request(format!(
                "a form field name is not valid UTF-8 once percent-decoded: {shown:?}"
            ))
        })?;
        let value = decode(value).ok_or_else(|| {
            let shown: String = name.chars().take(QUOTED_NAME_CHARS).collect();
            Error::bad_request(format!(
                "form field {shown:?} is not valid UTF-8 once percent-decoded"
            ))
        })?;
        fields.insert(name, value);
    }
    Ok(())
}

/// One form-encoded name or value: `+` is a space, `%XX` a byte (malformed escapes stay
/// as they are); `None` when the result is not UTF-8.
fn decode(raw: &[u8]) -> Option<String> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        // Nothing to decode, the common case (`val=` and plain characters): only
        // validate, which is several times cheaper than decoding byte by byte.
        return std::str::from_utf8(raw).ok().map(str::to_owned);
    }
    let spaced: std::borrow::Cow<'_, [u8]> = if raw.contains(&b'+') {
        raw.iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect::<Vec<u8>>()
            .into()
    } else {
        raw.into()
    };
    percent_encoding::percent_decode(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// Forms decode exactly as form_urlencoded decodes them, on the split-only fast path
    /// and through percent-decoding alike, when every field is UTF-8 once decoded; any
    /// field that is not is an error. This alphabet cannot spell U+FFFD (its escapes
    /// decode to `"`, `*`, 0xa2 and 0xaa), so a U+FFFD in form_urlencoded's lossy
    /// output marks exactly the forms that must be refused.
    #[test]
    fn forms_parse_as_form_urlencoded_parses_them() {
        use proptest::prelude::*;
        let alphabet = prop_oneof![
            Just(b'&'),
            Just(b'='),
            Just(b'%'),
            Just(b'+'),
            Just(b'2'),
            Just(b'a'),
            Just(0xc3u8),
            Just(0xa9u8),
            Just(0xffu8),
        ];
        proptest!(|(source in proptest::collection::vec(alphabet, 0..24))| {
            let mut parsed = HashMap::new();
            let result = parse_form(&source, &mut parsed);
            let pairs: Vec<(String, String)> = form_urlencoded::parse(&source)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if pairs.iter().any(|(k, v)| k.contains('\u{fffd}') || v.contains('\u{fffd}')) {
                let e = result.expect_err("a form with invalid UTF-8 must be refused");
                prop_assert_eq!(e.kind, ErrorKind::BadRequest);
            } else {
                prop_assert!(result.is_ok(), "{:?}", result);
                prop_assert_eq!(parsed, pairs.into_iter().collect::<HashMap<_, _>>());
            }
        });
    }

    #[test]
    fn invalid_utf8_in_a_field_is_refused_naming_the_field() {
        for source in [
            &b"val=\xff"[..],
            b"causal_payload=&val=%FF",
            b"val=caf%C3",
            b"val=\xc3+",
        ] {
            let e = parse_form(source, &mut HashMap::new()).expect_err("refused");
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("\"val\""), "{}", e.message);
        }
        let e = parse_form(b"v%FFl=1", &mut HashMap::new()).expect_err("refused");
        assert!(e.message.contains("name"), "{}", e.message);
        let mut fields = HashMap::new();
        parse_form(
            "val=caf\u{e9}&x=caf%C3%A9+%EF%BF%BD".as_bytes(),
            &mut fields,
        )
        .expect("valid UTF-8");
        assert_eq!(fields["val"], "caf\u{e9}");
        assert_eq!(fields["x"], "caf\u{e9} \u{fffd}");
        // Malformed escapes are left as they are, as before.
        parse_form(b"val=%zz%2", &mut fields).expect("malformed escapes are kept");
        assert_eq!(fields["val"], "%zz%2");
    }
}

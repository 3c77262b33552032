//! The rules for the names of the mesh (namespaces, components, endpoints,
//! event topics): they become key segments, NATS subjects and metric labels.

/// Longest allowed name segment; keeps keys, subjects and metric labels sane.
const MAX_NAME_LEN: usize = 64;

/// A namespace, component or endpoint name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: use 1-64 lowercase letters, digits, '-' or '_'")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

/// Names become key segments, NATS subjects and metric labels, so they are
/// limited to characters that are safe in all three.
pub(crate) fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_limited_to_safe_characters() {
        for good in ["dynamo", "backend-2", "gen_v1", "a"] {
            assert!(validate_name("endpoint", good).is_ok(), "{good}");
        }
        for bad in ["", "Generate", "a/b", "a.b", "a b", &"x".repeat(65)] {
            let err = validate_name("endpoint", bad).unwrap_err();
            assert!(err.to_string().contains("lowercase letters"), "{err}");
        }
    }
}

//! The identifier rule.
//!
//! Identifiers end up as NATS subject tokens (`tether.<app>.up.<p>.<did>`) and KV key
//! tokens, so the rule is deliberately narrow: no `.`, `*`, `>`, whitespace or anything
//! non-ASCII can get in. Tokens, the gateway, state and the business API all apply it.

/// Longest identifier accepted by [`valid_id`], in bytes.
pub const MAX_ID_LEN: usize = 64;

/// True when `s` is 1..=64 characters of `[A-Za-z0-9_-]`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_id_rule() {
        for ok in ["a", "A-z_09", "dev-1", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok:?} should be valid");
        }
        let too_long = "x".repeat(65);
        for bad in [
            "", "a.b", "a b", "a*", ">", "a:b", "a@b", "a=b", "é", "a\n", &too_long,
        ] {
            assert!(!valid_id(bad), "{bad:?} should be invalid");
        }
    }
}

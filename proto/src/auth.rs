//! The cluster token: the shared secret every connection presents (in a `Hello`) when the
//! cluster is configured with one, and the constant-time comparison servers check it with.
//!
//! This module does no I/O: callers read the token file and hand its text to
//! [`Token::from_file_text`].

/// A cluster token. Its `Debug` output never shows the secret, so a config struct holding one
/// can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the cluster token is empty")]
    Empty,
    #[error("the cluster token is {0} bytes long; at most {MAX_TOKEN_LEN} are allowed")]
    TooLong(usize),
}

/// Longest token accepted. A `Hello` body is read before the peer is trusted, so the server
/// bounds it; 1 KiB is far beyond any sensible secret.
pub const MAX_TOKEN_LEN: usize = 1024;

impl Token {
    /// A token from raw bytes; empty or over-long tokens are refused.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Token, TokenError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(TokenError::Empty);
        }
        if bytes.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(bytes.len()));
        }
        Ok(Token(bytes))
    }

    /// The token in a token file: its first line, trimmed of surrounding whitespace (so a
    /// trailing newline written by `echo` or an editor is not part of the secret).
    pub fn from_file_text(text: &str) -> Result<Token, TokenError> {
        Token::new(text.lines().next().unwrap_or("").trim().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends only on the lengths (never on
    /// where the first differing byte is), so a peer cannot guess the token byte by byte.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Compares `secret` with `presented` in time that depends only on their lengths: every byte
/// of `secret` is visited and differences are OR-ed together, with no early exit.
pub fn constant_time_eq(secret: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(secret.len() != presented.len());
    for (i, s) in secret.iter().enumerate() {
        // A shorter `presented` is compared against zeros: the loop still runs over all of
        // `secret`, and the length difference already made `diff` non-zero.
        let p = presented.get(i).copied().unwrap_or(0);
        diff |= s ^ p;
    }
    // Keeps the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"Secret"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(!constant_time_eq(b"ab", b"ab\0"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn file_text_is_first_line_trimmed() {
        let t = Token::from_file_text("  s3cret \nsecond line\n").unwrap();
        assert_eq!(t.as_bytes(), b"s3cret");
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cret "));
        assert_eq!(Token::from_file_text("\n"), Err(TokenError::Empty));
        assert_eq!(Token::from_file_text(""), Err(TokenError::Empty));
        assert!(Token::new(vec![b'x'; MAX_TOKEN_LEN + 1]).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = Token::new("hunter2").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(t)).contains("hunter2"));
    }
}

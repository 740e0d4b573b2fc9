//! The cluster-token handshake, both sides.
//!
//! A client that has a token sends `Hello` as the first frame of every connection and waits
//! for the answer before anything else; a server configured with a token serves nothing on a
//! connection until a `Hello` with the right token arrived (compared in constant time), and
//! answers anything else with `Unauthorized`, then closes. Tokens never appear in errors or
//! logs.

use std::time::Duration;

use kvpool_proto::{
    auth::MAX_TOKEN_LEN, decode_body, header::VERSION, ErrorCode, FrameLimits, Hello,
    HelloResponse, Token, WireError,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{frame, TransportError};

/// Largest `Hello` body a server reads from a peer it does not trust yet: the longest token
/// plus its length prefix and the version.
pub const MAX_HELLO_BODY: u32 = MAX_TOKEN_LEN as u32 + 16;

/// How long a server keeps reading (and discarding) after refusing a peer, and how much, so
/// the peer reads the refusal instead of a reset caused by its own unread requests.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);
pub const REFUSAL_LINGER_BYTES: usize = 64 << 20;

/// Reads a token file: its first line, trimmed. The error names the file, never its content.
pub fn read_token_file(path: &std::path::Path) -> Result<Token, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    Token::from_file_text(&text).map_err(|e| format!("token file {}: {e}", path.display()))
}

/// The server's answer to a `Hello` body: the response, or why the peer is refused. Without a
/// configured token every `Hello` is accepted (a client with a token works against an open
/// server).
pub fn check_hello(token: Option<&Token>, body: &[u8]) -> Result<HelloResponse, WireError> {
    let hello: Hello = match decode_body(body) {
        Ok(h) => h,
        // With a token, anything but a well-formed Hello with that token is a refusal.
        Err(e) if token.is_some() => {
            return Err(WireError::new(
                ErrorCode::Unauthorized,
                format!("Hello does not decode: {}", e.message),
            ))
        }
        Err(e) => return Err(e),
    };
    if let Some(t) = token {
        if !t.matches(&hello.token) {
            return Err(WireError::new(
                ErrorCode::Unauthorized,
                "wrong cluster token: check the client's --token-file / KVPOOL_TOKEN",
            ));
        }
    }
    Ok(HelloResponse {
        server_version: u16::from(VERSION),
    })
}

/// The refusal for a request that arrived before the connection's `Hello`.
pub fn hello_required() -> WireError {
    WireError::new(
        ErrorCode::Unauthorized,
        "this cluster requires a token: the first request on a connection must be Hello with \
         the cluster token (give the client --token-file or KVPOOL_TOKEN)",
    )
}

/// The refusal for a `Hello` too large to hold any acceptable token.
pub fn hello_too_large(body_len: u32, payload_len: u64) -> WireError {
    WireError::new(
        ErrorCode::Unauthorized,
        format!(
            "Hello of {body_len} body and {payload_len} payload bytes refused \
             (at most {MAX_HELLO_BODY} body bytes, no payload)"
        ),
    )
}

/// Sends `Hello` with `token` on a fresh connection and waits for the answer, within
/// `timeout`. A refusal becomes `Remote(Unauthorized)` with a message saying so.
pub async fn client_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    token: &Token,
    limits: &FrameLimits,
    timeout: Duration,
) -> Result<(), TransportError> {
    let hello = Hello {
        token: token.as_bytes().to_vec(),
        client_version: u16::from(VERSION),
    };
    let exchange = async {
        match frame::exchange(stream, &hello, limits).await {
            Ok(_) => Ok(()),
            Err(TransportError::Remote(w)) if w.code == ErrorCode::Unauthorized => {
                Err(TransportError::Remote(WireError::new(
                    ErrorCode::Unauthorized,
                    format!(
                        "the server refused this client's cluster token: {}",
                        w.message
                    ),
                )))
            }
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            op: "hello",
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_proto::encode_body;

    fn hello(token: &[u8]) -> Vec<u8> {
        encode_body(&Hello {
            token: token.to_vec(),
            client_version: 1,
        })
    }

    #[test]
    fn checks_the_token_only_when_configured() {
        let t = Token::new("s3cret").unwrap();
        assert!(check_hello(Some(&t), &hello(b"s3cret")).is_ok());
        let e = check_hello(Some(&t), &hello(b"s3creT")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(!e.message.contains("s3cre"), "{}", e.message);
        assert!(check_hello(Some(&t), &hello(b"")).is_err());
        assert!(check_hello(None, &hello(b"anything")).is_ok());
        assert_eq!(
            check_hello(Some(&t), b"\xff\xff").unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            check_hello(None, b"\xff\xff").unwrap_err().code,
            ErrorCode::MalformedBody
        );
    }
}

//! The P/D hand-off (roles, bootstrap port, holds and abort timeouts); being built (issue 5).

//! Engine simulator end to end; being built (issue 5).

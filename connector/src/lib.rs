//! The engine-side connector (prefix-block keys, KV-cache layouts, P/D hand-off). It builds on
//! `kvpool-client` only; its work is tracked as issue 5.

//! The clb daemon and CLI as processes (filled in with the control plane).

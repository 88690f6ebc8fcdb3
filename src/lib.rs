//! gm

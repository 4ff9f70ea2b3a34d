//! kernel-tests

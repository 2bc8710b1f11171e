//! Empty library target: lets `clb-user` name this crate as a build dependency (so cargo
//! rebuilds the eBPF object when it changes); the program itself is the `clb` binary target.
#![no_std]

//! livehost's overhead observer: what the host costs each VM (KVM exits and
//! their durations, vCPU run-queue delay) and each container (run-queue
//! latency, who preempted it, throttling, CPU pressure), aggregated in the
//! kernel by tp_btf programs and read out periodically.

pub mod cgroup;
pub mod kvm_guest;
pub mod observer;
pub mod prom;
pub mod reasons;
pub mod report;
pub mod tui;

pub mod skel {
    #![allow(
        clippy::all,
        unused,
        non_camel_case_types,
        non_snake_case,
        missing_docs
    )]
    include!(concat!(env!("OUT_DIR"), "/overhead.skel.rs"));
}

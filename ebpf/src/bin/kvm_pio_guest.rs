//! Runs a tiny KVM guest doing exactly N port writes, then prints one JSON
//! line: {"pid":..,"tid":..,"io_exits":..,"runs":..,"elapsed_ns":..}.
//! Usage: kvm-pio-guest N [--delay-ms MS]   (the delay lets an observer
//! start first when both run from a script).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 || args[1] == "--help" || args[1] == "-h" {
        eprintln!(
            "usage: kvm-pio-guest N [--delay-ms MS]\n  runs a real-mode KVM guest that writes port {:#x} exactly N times, then HLT",
            livehost_ebpf::kvm_guest::PORT
        );
        std::process::exit(if args.len() < 2 { 2 } else { 0 });
    }
    let Ok(n) = args[1].parse::<u32>() else {
        eprintln!(
            "kvm-pio-guest: N must be a positive integer, got {:?}",
            args[1]
        );
        std::process::exit(2);
    };
    if args.get(2).map(String::as_str) == Some("--delay-ms") {
        let ms = args.get(3).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    match livehost_ebpf::kvm_guest::run_pio_guest(n) {
        Ok(r) => println!(
            "{{\"pid\":{},\"tid\":{},\"io_exits\":{},\"runs\":{},\"elapsed_ns\":{}}}",
            r.pid, r.tid, r.io_exits, r.runs, r.elapsed_ns
        ),
        Err(e) => {
            eprintln!("kvm-pio-guest: {e:#}");
            std::process::exit(1);
        }
    }
}

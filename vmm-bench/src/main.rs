fn main() {
    let p = vmm_bench::vm::probe::probe(std::time::Duration::from_secs(1));
    println!("{}", serde_json::to_string_pretty(&p).unwrap());
    let kvm = vmm_bench::vm::Kvm::open().unwrap();
    let r = vmm_bench::vm::boot::run_unikernel(&kvm, &Default::default()).unwrap();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    let c = vmm_bench::vm::boot::compare_exit_loops(&kvm, 500, 5).unwrap();
    println!("{}", serde_json::to_string_pretty(&c).unwrap());
}

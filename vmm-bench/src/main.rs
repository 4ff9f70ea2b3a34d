fn main() {
    let r = vmm_bench::qemu::run_unikernel(vmm_bench::vm::boot::UNIKERNEL, 64, 1000, std::time::Duration::from_secs(20)).unwrap();
    println!("{r:?}");
    let i = vmm_bench::qemu::linux_image().unwrap();
    println!("{i:?}");
    let r = vmm_bench::qemu::run_linux(&i, 64, 1000, std::time::Duration::from_secs(60)).unwrap();
    println!("{r:?}");
}

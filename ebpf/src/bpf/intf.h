/* Types shared by the BPF programs and the Rust side (the skeleton generator
 * turns these into Rust structs, so layout changes reach both at once). */
#ifndef OVERHEAD_INTF_H
#define OVERHEAD_INTF_H

#define HIST_SLOTS 32

/* What an exit_key counts. */
enum ev_kind {
	KIND_HW_EXIT = 0,   /* kvm_exit -> kvm_entry, reason = vendor exit code */
	KIND_USER_EXIT = 1, /* kvm_userspace_exit, reason = KVM_EXIT_* */
	KIND_PIO_IN = 2,    /* kvm_pio read, reason = port */
	KIND_PIO_OUT = 3,   /* kvm_pio write, reason = port */
};

/* The exit reason's vendor, from kvm_exit's `isa` argument. */
enum kvm_isa {
	ISA_UNKNOWN = 0,
	ISA_VMX = 1,
	ISA_SVM = 2,
};

/* The largest value of the interval `epoch` (see overhead.bpf.c): two slots,
 * so the interval user space is reading stays still while the next fills. */
struct ival_max {
	__u64 max_ns[2];
	__u64 epoch[2];
};

struct exit_key {
	__u32 tgid;
	__u32 tid;
	__u32 reason;
	__u16 kind;
	__u16 isa;
};

struct exit_val {
	__u64 count;  /* counted at kvm_exit: exact even if never re-entered */
	__u64 timed;  /* exits whose kvm_entry was seen: sum/max/hist cover these */
	__u64 sum_ns;
	__u64 max_ns;
	__u64 hist[HIST_SLOTS]; /* slot i: durations in [2^i, 2^(i+1)) ns */
	struct ival_max imax;
};

/* One per thread seen doing KVM work (a vCPU thread). */
struct vcpu_val {
	__u32 tgid;
	__s32 vcpu_id; /* -1 until a kvm_exit tells us */
	char comm[16]; /* at first sight; the thread may be gone at report time */
	__u64 rq_count;
	__u64 rq_sum_ns;
	__u64 rq_max_ns;
};

struct cg_val {
	__u64 cpu_ns;
	__u64 rq_count;
	__u64 rq_sum_ns;
	__u64 rq_max_ns;
	__u64 hist[HIST_SLOTS];
	struct ival_max rq_imax;
};

/* victim cgroup waited while culprit held the CPU (wait_ns: the overlap;
 * wait_count: waits it took part in), or was preempted by it. culprit 0:
 * the CPU was idle (wakeup latency); ~0ULL: not attributable (the wait began
 * on another CPU, or outlived the per-CPU history). */
struct pair_key {
	__u64 victim;
	__u64 culprit;
};

struct pair_val {
	__u64 wait_count;
	__u64 wait_ns;
	__u64 preemptions;
};

/* Indexes into the drops array: map updates that failed because a map was
 * full, so numbers shown to the user are known to be incomplete. */
enum drop_idx {
	DROP_EXIT_STATS = 0,
	DROP_EXIT_START = 1,
	DROP_VCPU = 2,
	DROP_CGROUP = 3,
	DROP_PAIR = 4,
	DROP_WAKE = 5,
	DROP_SLOTS = 8,
};

#endif

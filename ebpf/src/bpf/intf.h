/* Everything the BPF programs and the Rust side both see. The skeleton
 * generator turns the structs into Rust structs (skel::types); build.rs turns
 * the #defines and enums into Rust constants and enums (livehost_ebpf::intf),
 * so a change here reaches both sides at once. Rust names an enum's values
 * after their C names without the common prefix, lowercased (KIND_PIO_IN:
 * "pio_in"): those are the names in the JSON and Prometheus output.
 * build.rs only understands `#define NAME <integer>` and enums with integer
 * values; it fails the build on anything else here. */
#ifndef OVERHEAD_INTF_H
#define OVERHEAD_INTF_H

/* Log2 histogram slots: slot i counts durations in [2^i, 2^(i+1)) ns. */
#define HIST_SLOTS 32
/* A task's comm, as bpf_get_current_comm fills it. */
#define TASK_COMM_LEN 16
/* Stretches of CPU time each CPU remembers to split a wait over. */
#define SEGS 16
/* pair_key.culprit values that are not a cgroup id. */
#define CULPRIT_IDLE 0                        /* the CPU was idle */
#define CULPRIT_UNKNOWN 0xffffffffffffffffULL /* not attributable */
/* kvm_userspace_exit reasons for a KVM_RUN that returned an error (the
 * run's exit_reason is then stale, not a new exit): interrupted by a
 * signal (-EINTR, "restart" as the kernel prints it) or another error. */
#define USER_EXIT_RESTART 0x10000
#define USER_EXIT_ERROR 0x10001
/* Size of the drops array (room to add counters without resizing). */
#define DROP_SLOTS 8

/* What an exit_key counts. */
enum exit_kind {
	KIND_HW = 0,      /* kvm_exit -> kvm_entry, reason = vendor exit code */
	KIND_USER = 1,    /* kvm_userspace_exit, reason = KVM_EXIT_* */
	KIND_PIO_IN = 2,  /* kvm_pio read, reason = port */
	KIND_PIO_OUT = 3, /* kvm_pio write, reason = port */
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
	char comm[TASK_COMM_LEN]; /* at first sight; the thread may be gone at report time */
	__u64 rq_count;
	__u64 rq_sum_ns;
	__u64 rq_max_ns;
	/* 1 once the thread exited (sched_process_exit): user space exports
	 * the entry one last time, then deletes it. */
	__u32 exited;
	__u32 _pad;
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
 * wait_count: waits it took part in), or was preempted by it. culprit
 * CULPRIT_IDLE: the CPU was idle (wakeup latency); CULPRIT_UNKNOWN: not
 * attributable (the wait outlived the per-CPU history). A wait that began
 * on another CPU is split by the history of the CPU the task is switched
 * in on: a known limit (docs/notes/ebpf.md). */
struct pair_key {
	__u64 victim;
	__u64 culprit;
};

struct pair_val {
	__u64 wait_count;
	__u64 wait_ns;
	__u64 preemptions;
};

/* One stretch of CPU time on one CPU, and whose it was (cgroup id, 0 for
 * the idle task). */
struct seg {
	__u64 start;
	__u64 end;
	__u64 cgid;
};

/* Per-CPU state of the sched_switch program; user space reads pend_* to add
 * CPU time not yet flushed into cg_stats. */
struct oncpu {
	__u64 ts;
	__u64 cgid;
	/* CPU time not yet added to cg_stats: flushed when the cgroup changes
	 * or when its cg_val is at hand anyway; user space adds it when reading,
	 * so totals stay exact while most switches skip a hash lookup. */
	__u64 pend_cg;
	__u64 pend_ns;
	__u32 pid;
	__u32 head;
	struct seg segs[SEGS];
};

/* Indexes into the drops array: map updates that failed because a map was
 * full, so numbers shown to the user are known to be incomplete. The
 * lowercased names ("exit_stats", ..., "wakeups") are the keys of `drops`
 * in JSON and the `map` label in Prometheus. */
enum drop_counter {
	DROP_EXIT_STATS = 0, /* exit_stats full */
	DROP_EXIT_START = 1, /* exit_start update failed */
	DROP_VCPUS = 2,      /* vcpus full */
	DROP_CGROUPS = 3,    /* cg_stats full */
	DROP_PAIRS = 4,      /* pairs full */
	DROP_WAKEUPS = 5,    /* a woken pid beyond task_state (pid_max raised) */
};
_Static_assert(DROP_WAKEUPS < DROP_SLOTS, "drops array too small");

#endif

// SPDX-License-Identifier: GPL-2.0
/* The overhead observer's in-kernel half: aggregates KVM exits per vCPU
 * thread and scheduler delay per cgroup into shared hash maps (updated
 * atomically; only the per-CPU scheduler state and the drop counters are
 * per-CPU). Nothing is sent per event; user space reads the maps on its
 * own schedule. */
#pragma clang diagnostic ignored "-Wvisibility"
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "intf.h"

char LICENSE[] SEC("license") = "GPL";

#define TASK_RUNNING 0

/* The current reporting interval. User space bumps it (through the mmapped
 * .bss) each time it reads the maps, then reads the slot of the interval it
 * just closed, which no program writes any more: a per-interval max without
 * resetting maps under the programs' feet. */
volatile u64 epoch;

/* *p = max(*p, v), safe against other CPUs updating the same value (the
 * maps are shared, not per-CPU: see the maps below). A few tries: losing
 * to a steady stream of larger values is harmless. */
static __always_inline void atomic_max(u64 *p, u64 v)
{
	u64 old = *p;
#pragma unroll
	for (int i = 0; i < 4 && v > old; i++) {
		u64 seen = __sync_val_compare_and_swap(p, old, v);
		if (seen == old)
			break;
		old = seen;
	}
}

static __always_inline void ival_max_add(struct ival_max *m, u64 v)
{
	u64 e = epoch;
	u32 s = e & 1;
	u64 seen = m->epoch[s];
	/* The first writer of a new interval claims the slot and resets it;
	 * the others (and later events) raise it. */
	if (seen != e && __sync_val_compare_and_swap(&m->epoch[s], seen, e) == seen)
		m->max_ns[s] = v;
	else
		atomic_max(&m->max_ns[s], v);
}

struct exit_start {
	u64 ts;
	u32 reason;
	u32 isa;
};

/* Each CPU keeps its last SEGS stretches of CPU time and whose they were
 * (struct oncpu, intf.h): a task's run-queue wait is split over the cgroups
 * that actually ran during it, not blamed wholesale on whoever ran last. At
 * most CULPRITS cgroups are told apart per wait. */
#define CULPRITS 4

/* Memory: the maps are shared hashes, not per-CPU ones: a per-CPU value is
 * multiplied by the number of possible CPUs (a 320-byte value in 16384
 * slots is 1.3 GiB at 256 CPUs). Counters shared between CPUs are updated
 * atomically; exit_stats is keyed by thread, and a thread runs on one CPU
 * at a time. The loader sizes each map from the command line
 * (observer.rs), and reports the kernel memory they take. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct exit_key);
	__type(value, struct exit_val);
} exit_stats SEC(".maps");

/* Keyed by tid: the exit a vCPU thread is handling right now. The last
 * exit of a vCPU (HLT to user space, VM teardown) is never followed by
 * kvm_entry: sched_process_exit deletes the dead thread's entry. (Not an
 * LRU: its per-CPU free lists would evict live entries on a many-CPU host.) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, u32);
	__type(value, struct exit_start);
} exit_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, u32);
	__type(value, struct vcpu_val);
} vcpus SEC(".maps");

/* Indexed by tid: when a runnable task started waiting for a CPU (0: not
 * waiting), and VCPU_FLAG once it ran KVM_RUN. A plain array, neither
 * task-local storage nor a hash: creating task storage from sched_wakeup
 * or sched_switch allocates and takes the storage lock under the run-queue
 * lock, which deadlocked Debian 12's 6.1 kernel in our nested-KVM guest
 * test (soft lockup, RCU stall); a hash takes a bucket lock and costs ~2x
 * on these paths. An array slot is a plain load/store, never allocates,
 * never locks. The loader sizes it to the kernel's pid_max. */
#define VCPU_FLAG (1ULL << 63)
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 32768);
	__type(key, u32);
	__type(value, u64);
} task_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct oncpu);
} oncpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct cg_val);
} cg_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, struct pair_val);
} pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_SLOTS);
	__type(key, u32);
	__type(value, u64);
} drops SEC(".maps");

static __always_inline void drop(u32 idx)
{
	u64 *d = bpf_map_lookup_elem(&drops, &idx);
	if (d)
		(*d)++;
}

static __always_inline u32 log2_slot(u64 v)
{
	u32 r = 0;
	/* Branch-free-ish binary search; the verifier needs a bounded result. */
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r < HIST_SLOTS ? r : HIST_SLOTS - 1;
}

/* Default-hierarchy cgroup id of any task (bpf_get_current_cgroup_id only
 * serves current, and sched_switch needs prev and next). */
static __always_inline u64 task_cgid(struct task_struct *t)
{
	/* tp_btf pointers are BTF-typed: direct loads are checked PROBE_MEM
	 * loads, far cheaper than bpf_probe_read_kernel helper calls. */
	return t->cgroups->dfl_cgrp->kn->id;
}

static __always_inline struct vcpu_val *vcpu_of(u32 tid, u32 tgid)
{
	struct vcpu_val *v = bpf_map_lookup_elem(&vcpus, &tid);
	if (v && v->tgid == tgid && !v->exited)
		return v;
	struct vcpu_val init = { .tgid = tgid, .vcpu_id = -1 };
	bpf_get_current_comm(init.comm, sizeof(init.comm));
	/* A dead vCPU's entry whose tid was reused (by another process, or
	 * before user space's final export) is replaced: the new thread must
	 * not inherit its tgid, comm, vcpu id or counters. EEXIST from a racing
	 * insert is fine: the lookup below finds it. */
	bpf_map_update_elem(&vcpus, &tid, &init, v ? BPF_ANY : BPF_NOEXIST);
	v = bpf_map_lookup_elem(&vcpus, &tid);
	if (!v)
		drop(DROP_VCPUS);
	return v;
}

/* The vCPU thread's slot gets VCPU_FLAG, so sched_switch looks up vcpus
 * only for vCPU threads. */
static __always_inline void mark_vcpu(u32 tid)
{
	u64 *st = bpf_map_lookup_elem(&task_state, &tid);
	if (st && !(*st & VCPU_FLAG))
		__sync_fetch_and_or(st, VCPU_FLAG);
}

static __always_inline void exit_add(struct exit_key *k, u64 n, u64 dur, bool timed)
{
	struct exit_val *v = bpf_map_lookup_elem(&exit_stats, k);
	if (!v) {
		struct exit_val zero = {};
		bpf_map_update_elem(&exit_stats, k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&exit_stats, k);
		if (!v) {
			drop(DROP_EXIT_STATS);
			return;
		}
	}
	v->count += n;
	if (timed) {
		v->timed++;
		v->sum_ns += dur;
		if (dur > v->max_ns)
			v->max_ns = dur;
		ival_max_add(&v->imax, dur);
		v->hist[log2_slot(dur)]++;
	}
}

/* The vendor exit code of the exit being traced. The vendor structs live in
 * kvm_amd / kvm_intel (module or vmlinux BTF); the type checks below are
 * resolved at load time, so the branch for an absent vendor is dead code
 * the verifier never sees. */
static __always_inline u32 exit_reason(struct kvm_vcpu *vcpu, u32 isa)
{
	if (isa == ISA_SVM && bpf_core_type_exists(struct vcpu_svm)) {
		struct vcpu_svm *svm =
			(void *)vcpu - bpf_core_field_offset(struct vcpu_svm, vcpu);
		struct vmcb *vmcb = BPF_CORE_READ(svm, vmcb);
		return BPF_CORE_READ(vmcb, control.exit_code);
	}
	if (isa == ISA_VMX && bpf_core_field_exists(struct vcpu_vmx, exit_reason)) {
		struct vcpu_vmx *vmx =
			(void *)vcpu - bpf_core_field_offset(struct vcpu_vmx, vcpu);
		return BPF_CORE_READ(vmx, exit_reason.full) & 0xffff;
	}
	if (isa == ISA_VMX && bpf_core_field_exists(struct vcpu_vmx___vt, vt)) {
		struct vcpu_vmx___vt *vmx =
			(void *)vcpu - bpf_core_field_offset(struct vcpu_vmx___vt, vcpu);
		return BPF_CORE_READ(vmx, vt.exit_reason.full) & 0xffff;
	}
	return 0xffffffff;
}

SEC("tp_btf/kvm_exit")
int handle_kvm_exit(u64 *ctx)
{
	struct kvm_vcpu *vcpu = (void *)ctx[0];
	u32 isa = (u32)ctx[1];
	/* 6.12's verifier types this argument trusted_ptr_or_null: the
	 * container_of in exit_reason() needs the check before it. */
	if (!vcpu)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct exit_start s = {
		.ts = bpf_ktime_get_ns(),
		.reason = exit_reason(vcpu, isa),
		.isa = isa,
	};
	if (bpf_map_update_elem(&exit_start, &tid, &s, BPF_ANY))
		drop(DROP_EXIT_START);
	struct exit_key k = {
		.tgid = id >> 32, .tid = tid, .reason = s.reason,
		.kind = KIND_HW, .isa = isa,
	};
	exit_add(&k, 1, 0, false);
	struct vcpu_val *v = vcpu_of(tid, id >> 32);
	if (v && v->vcpu_id < 0)
		v->vcpu_id = BPF_CORE_READ(vcpu, vcpu_id);
	mark_vcpu(tid);
	return 0;
}

/* Only ctx[0] is used: 6.1 passes (vcpu), newer kernels (vcpu, immediate_exit). */
SEC("tp_btf/kvm_entry")
int handle_kvm_entry(u64 *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct exit_start *s = bpf_map_lookup_elem(&exit_start, &tid);
	if (!s)
		return 0; /* first entry of this vCPU, or we attached mid-exit */
	u64 dur = bpf_ktime_get_ns() - s->ts;
	struct exit_key k = {
		.tgid = id >> 32, .tid = tid, .reason = s->reason,
		.kind = KIND_HW, .isa = s->isa,
	};
	bpf_map_delete_elem(&exit_start, &tid);
	exit_add(&k, 0, dur, true);
	return 0;
}

SEC("tp_btf/kvm_userspace_exit")
int handle_kvm_userspace_exit(u64 *ctx)
{
	u32 reason = (u32)ctx[0];
	int err = (int)ctx[1];
	/* KVM_RUN failed: exit_reason is left from an earlier exit. */
	if (err < 0)
		reason = err == -4 /* EINTR */ ? USER_EXIT_RESTART : USER_EXIT_ERROR;
	u64 id = bpf_get_current_pid_tgid();
	struct exit_key k = {
		.tgid = id >> 32, .tid = (u32)id, .reason = reason,
		.kind = KIND_USER,
	};
	vcpu_of((u32)id, id >> 32);
	mark_vcpu((u32)id);
	exit_add(&k, 1, 0, false);
	return 0;
}

SEC("tp_btf/kvm_pio")
int handle_kvm_pio(u64 *ctx)
{
	u32 rw = (u32)ctx[0];
	u32 port = (u32)ctx[1];
	u64 id = bpf_get_current_pid_tgid();
	struct exit_key k = {
		.tgid = id >> 32, .tid = (u32)id, .reason = port,
		.kind = rw ? KIND_PIO_OUT : KIND_PIO_IN,
	};
	exit_add(&k, 1, 0, false);
	return 0;
}

static __always_inline void record_wake(u32 pid, u64 now)
{
	u64 *st = pid ? bpf_map_lookup_elem(&task_state, &pid) : 0;
	if (st)
		*st = (*st & VCPU_FLAG) | now;
	else if (pid)
		drop(DROP_WAKEUPS); /* pid beyond the array: pid_max raised after load */
}

SEC("tp_btf/sched_wakeup")
int handle_sched_wakeup(u64 *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	if (!p)
		return 0;
	record_wake(p->pid, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int handle_sched_wakeup_new(u64 *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	if (!p)
		return 0;
	record_wake(p->pid, bpf_ktime_get_ns());
	return 0;
}

static __always_inline struct cg_val *cg_of(u64 cgid)
{
	struct cg_val *c = bpf_map_lookup_elem(&cg_stats, &cgid);
	if (c)
		return c;
	struct cg_val zero = {};
	bpf_map_update_elem(&cg_stats, &cgid, &zero, BPF_NOEXIST);
	c = bpf_map_lookup_elem(&cg_stats, &cgid);
	if (!c)
		drop(DROP_CGROUPS);
	return c;
}

static __always_inline struct pair_val *pair_of(u64 victim, u64 culprit)
{
	struct pair_key k = { .victim = victim, .culprit = culprit };
	struct pair_val *p = bpf_map_lookup_elem(&pairs, &k);
	if (p)
		return p;
	struct pair_val zero = {};
	bpf_map_update_elem(&pairs, &k, &zero, BPF_NOEXIST);
	p = bpf_map_lookup_elem(&pairs, &k);
	if (!p)
		drop(DROP_PAIRS);
	return p;
}

/* A vCPU thread that exits stops being one: its task_state slot (flag and
 * any wait start) is cleared and its vcpus entry marked exited, so a thread
 * that later reuses the tid is neither counted in the dead VM nor inherits
 * its identity. User space forgets exited entries after exporting them. */
SEC("tp_btf/sched_process_exit")
int handle_sched_process_exit(u64 *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	if (!p)
		return 0;
	u32 pid = p->pid;
	u64 *st = bpf_map_lookup_elem(&task_state, &pid);
	if (!st || !(*st & VCPU_FLAG))
		return 0;
	*st = 0;
	struct vcpu_val *v = bpf_map_lookup_elem(&vcpus, &pid);
	if (v)
		v->exited = 1;
	bpf_map_delete_elem(&exit_start, &pid);
	return 0;
}

/* sched_switch's prototype: (preempt, prev, next) until 5.17, then
 * (preempt, prev, next, prev_state). The local typedef is matched against
 * the kernel's at load time; on an older kernel the ctx[3] read below is
 * dead code the verifier never sees, and prev's state is read from the task. */
typedef void (*btf_trace_sched_switch___4args)(void *, bool, struct task_struct *,
					       struct task_struct *, unsigned int);
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

/* Set once a program ran: 1 when prev_state came from the tracepoint's
 * fourth argument, 2 when it was read from the task (kernel < 5.18). */
volatile u32 switch_state_source;

static __always_inline u32 prev_task_state(u64 *ctx, struct task_struct *prev)
{
	if (bpf_core_type_matches(btf_trace_sched_switch___4args)) {
		switch_state_source = 1;
		return (u32)ctx[3];
	}
	switch_state_source = 2;
	if (bpf_core_field_exists(prev->__state))
		return BPF_CORE_READ(prev, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)prev, state);
}

/* Waits shorter than this go wholesale to whoever ran last on the CPU:
 * splitting them costs a loop and several hash lookups on the hottest
 * path, and a noisy neighbour shows in long waits, not in these. */
#define SHORT_WAIT_NS 50000ULL

static __always_inline void add_wait(u64 victim, u64 culprit, u64 ns)
{
	struct pair_val *p = pair_of(victim, culprit);
	if (p) {
		__sync_fetch_and_add(&p->wait_count, 1);
		__sync_fetch_and_add(&p->wait_ns, ns);
	}
}

/* Split a wait [t0, now) of cgroup `victim` over the stretches of this
 * CPU's ring that overlap it. */
static __always_inline void attribute_wait(struct oncpu *o, u64 victim, u64 last,
					   u64 t0, u64 now)
{
	u64 delta = now > t0 ? now - t0 : 0;
	if (delta < SHORT_WAIT_NS) {
		add_wait(victim, last, delta);
		return;
	}
	u64 who[CULPRITS] = {};
	u64 ns[CULPRITS] = {};
	u64 attributed = 0;
	u32 head = o->head;
#pragma unroll
	for (int i = 0; i < SEGS; i++) {
		struct seg *sg = &o->segs[(head - 1 - i) & (SEGS - 1)];
		if (sg->end <= t0 || sg->end == 0)
			break;
		u64 from = sg->start > t0 ? sg->start : t0;
		u64 to = sg->end < now ? sg->end : now;
		if (to <= from)
			continue;
		u64 ov = to - from;
		attributed += ov;
		int placed = 0;
#pragma unroll
		for (int j = 0; j < CULPRITS; j++) {
			if (!placed && (ns[j] == 0 || who[j] == sg->cgid)) {
				who[j] = sg->cgid;
				ns[j] += ov;
				placed = 1;
			}
		}
		if (!placed)
			ns[CULPRITS - 1] += ov; /* rare: >4 cgroups in one wait */
	}
	/* Waited on another CPU before migrating, or longer than the ring
	 * remembers: say so rather than guess. */
	if (delta > attributed)
		add_wait(victim, CULPRIT_UNKNOWN, delta - attributed);
#pragma unroll
	for (int j = 0; j < CULPRITS; j++) {
		if (ns[j])
			add_wait(victim, who[j], ns[j]);
	}
}

SEC("tp_btf/sched_switch")
int handle_sched_switch(u64 *ctx)
{
	bool preempt = (bool)ctx[0];
	struct task_struct *prev = (void *)ctx[1];
	struct task_struct *next = (void *)ctx[2];
	if (!prev || !next)
		return 0;
	u32 prev_state = prev_task_state(ctx, prev);
	u64 now = bpf_ktime_get_ns();
	u32 zero = 0;
	u32 prev_pid = prev->pid;
	u32 next_pid = next->pid;

	struct oncpu *o = bpf_map_lookup_elem(&oncpu, &zero);
	if (!o)
		return 0;
	/* The idle task is nobody's cgroup: as a culprit it means "CPU was
	 * idle". prev's cgroup was looked up when it was switched in. */
	u64 cached_cg = o->cgid;
	/* Keeps clang from merging this load with task_cgid's last one: the
	 * verifier refuses one instruction on two kinds of pointer. */
	barrier_var(cached_cg);
	u64 prev_cg = !prev_pid ? CULPRIT_IDLE
		: (o->ts && o->pid == prev_pid) ? cached_cg : task_cgid(prev);
	u64 next_cg = next_pid ? task_cgid(next) : CULPRIT_IDLE;
	if (prev_pid && o->ts && o->pid == prev_pid) {
		if (o->pend_ns && o->pend_cg != prev_cg) {
			struct cg_val *f = cg_of(o->pend_cg);
			if (f)
				__sync_fetch_and_add(&f->cpu_ns, o->pend_ns);
			o->pend_ns = 0;
		}
		o->pend_cg = prev_cg;
		o->pend_ns += now - o->ts;
	}

	/* prev stays on the run queue when it was preempted, whatever state it
	 * was heading for (set_current_state() then preempted before
	 * schedule()), or when it is still TASK_RUNNING (yield, ...). */
	if (prev_pid && (preempt || prev_state == TASK_RUNNING)) {
		/* Involuntary: prev goes back on the run queue now. */
		record_wake(prev_pid, now);
		struct pair_val *p = pair_of(prev_cg, next_cg);
		if (p)
			__sync_fetch_and_add(&p->preemptions, 1);
	}

	/* Close prev's stretch (idle included, as cgroup 0). */
	if (o->ts) {
		struct seg *sg = &o->segs[o->head & (SEGS - 1)];
		sg->start = o->ts;
		sg->end = now;
		sg->cgid = prev_cg;
		o->head++;
	}

	u64 *st = next_pid ? bpf_map_lookup_elem(&task_state, &next_pid) : 0;
	u64 state = st ? *st : 0;
	if (state & ~VCPU_FLAG) {
		{
			u64 t0 = state & ~VCPU_FLAG;
			u64 delta = now > t0 ? now - t0 : 0;
			*st = state & VCPU_FLAG;
			struct cg_val *c = cg_of(next_cg);
			if (c && o->pend_ns && o->pend_cg == next_cg) {
				__sync_fetch_and_add(&c->cpu_ns, o->pend_ns);
				o->pend_ns = 0;
			}
			if (c) {
				__sync_fetch_and_add(&c->rq_count, 1);
				__sync_fetch_and_add(&c->rq_sum_ns, delta);
				atomic_max(&c->rq_max_ns, delta);
				ival_max_add(&c->rq_imax, delta);
				__sync_fetch_and_add(&c->hist[log2_slot(delta)], 1);
			}
			attribute_wait(o, next_cg, prev_cg, t0, now);
			struct vcpu_val *v = (state & VCPU_FLAG)
				? bpf_map_lookup_elem(&vcpus, &next_pid) : 0;
			if (v) {
				__sync_fetch_and_add(&v->rq_count, 1);
				__sync_fetch_and_add(&v->rq_sum_ns, delta);
				atomic_max(&v->rq_max_ns, delta);
			}
		}
	}
	o->ts = now;
	o->cgid = next_cg;
	o->pid = next_pid;
	return 0;
}

/* Calibration only (the bench): empty programs on the observer's hooks,
 * whose run time is the per-event floor of this kernel and machine
 * (trampoline, stats clock reads), to compare the real programs against;
 * loaded alone they are the "empty programs" leg of the bench. */
#define CALIB(tp)                      \
	SEC("tp_btf/" #tp)             \
	int calib_##tp(u64 *ctx)       \
	{                              \
		return 0;              \
	}
CALIB(kvm_exit)
CALIB(kvm_entry)
CALIB(kvm_userspace_exit)
CALIB(kvm_pio)
CALIB(sched_wakeup)
CALIB(sched_wakeup_new)
CALIB(sched_switch)
CALIB(sched_process_exit)

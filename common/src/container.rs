//! How livehost names the cgroup of a container it launches, in one place:
//! vmm-bench's launcher creates the leaf, the observer turns it back into a
//! container name. The `.scope` suffix follows systemd's convention for a
//! group of processes started by someone else.

/// The cgroup leaf name for a container called `name`.
pub fn cgroup_leaf(name: &str) -> String {
    format!("livehost-{name}.scope")
}

/// The container name, if `component` (one path component of a cgroup
/// path) is a leaf made by [`cgroup_leaf`].
pub fn name_from_leaf(component: &str) -> Option<&str> {
    component
        .strip_prefix("livehost-")?
        .strip_suffix(".scope")
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        assert_eq!(name_from_leaf(&cgroup_leaf("demo-app")), Some("demo-app"));
        assert_eq!(name_from_leaf("livehost-.scope"), None);
        assert_eq!(name_from_leaf("docker-abc.scope"), None);
        assert_eq!(name_from_leaf("livehost-x"), None);
    }
}

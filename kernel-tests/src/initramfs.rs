//! The one initramfs writer: a newc cpio archive written by us. kernel-tests'
//! guests and vmm-bench's QEMU-Linux row both build theirs here.
//!
//! The archive is left uncompressed: the kernel unpacks it faster than it
//! would decompress it under TCG, and the files are local anyway.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One file system object in the archive.
#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32, mode: u32 },
}

/// An initramfs being assembled; paths are absolute guest paths.
#[derive(Debug, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

fn normalize(guest: &str) -> Result<String> {
    if !guest.starts_with('/') {
        bail!("guest path {guest:?} must be absolute");
    }
    let parts: Vec<&str> = guest
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        bail!("guest path {guest:?} must not contain '..'");
    }
    Ok(format!("/{}", parts.join("/")))
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn parents(&mut self, path: &str) {
        let mut cur = String::new();
        let comps: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push('/');
            cur.push_str(c);
            self.nodes.entry(cur.clone()).or_insert(Node::Dir);
        }
    }

    pub fn dir(&mut self, guest: &str) -> Result<()> {
        let p = normalize(guest)?;
        self.parents(&p);
        self.nodes.entry(p).or_insert(Node::Dir);
        Ok(())
    }

    pub fn file(&mut self, guest: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        let p = normalize(guest)?;
        self.parents(&p);
        self.nodes.insert(p, Node::File { data, mode });
        Ok(())
    }

    pub fn symlink(&mut self, guest: &str, target: &str) -> Result<()> {
        let p = normalize(guest)?;
        self.parents(&p);
        self.nodes
            .entry(p)
            .or_insert(Node::Symlink(target.to_string()));
        Ok(())
    }

    /// A character device node, e.g. `/dev/console` (5, 1): the kernel
    /// opens it for init before anything could mount devtmpfs.
    pub fn char_dev(&mut self, guest: &str, major: u32, minor: u32, mode: u32) -> Result<()> {
        let p = normalize(guest)?;
        self.parents(&p);
        self.nodes.insert(p, Node::CharDev { major, minor, mode });
        Ok(())
    }

    pub fn contains(&self, guest: &str) -> bool {
        normalize(guest).is_ok_and(|p| self.nodes.contains_key(&p))
    }

    /// Copy a host file, keeping its permission bits.
    pub fn copy(&mut self, host: &Path, guest: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(host).with_context(|| format!("cannot read {}", host.display()))?;
        if meta.is_dir() {
            return self.copy_tree(host, guest);
        }
        let data =
            std::fs::read(host).with_context(|| format!("cannot read {}", host.display()))?;
        self.file(guest, data, meta.permissions().mode() & 0o7777)
    }

    fn copy_tree(&mut self, host: &Path, guest: &str) -> Result<()> {
        self.dir(guest)?;
        for e in
            std::fs::read_dir(host).with_context(|| format!("cannot list {}", host.display()))?
        {
            let e = e?;
            let g = format!(
                "{}/{}",
                guest.trim_end_matches('/'),
                e.file_name().to_string_lossy()
            );
            let ft = e.file_type()?;
            if ft.is_symlink() {
                let t = std::fs::read_link(e.path())?;
                self.symlink(&g, &t.to_string_lossy())?;
            } else {
                self.copy(&e.path(), &g)?;
            }
        }
        Ok(())
    }

    /// Copy a host program and, if it is dynamically linked, the shared
    /// libraries and loader it needs (as `ldd` resolves them on the host).
    pub fn copy_program(&mut self, host: &Path, guest: &str) -> Result<()> {
        self.copy(host, guest)?;
        for lib in shared_libraries(host)? {
            let g = lib.to_string_lossy().into_owned();
            if !self.contains(&g) {
                // Resolve symlinked libraries (libfoo.so.1 -> libfoo.so.1.2) to
                // their content under the name the loader asks for.
                let real = std::fs::canonicalize(&lib).unwrap_or(lib.clone());
                self.copy(&real, &g)?;
            }
        }
        Ok(())
    }

    /// Write the archive in newc format, padded to a 512-byte block.
    pub fn write_to(&self, mut w: impl Write) -> Result<()> {
        let mut len = 0;
        for (ino, (path, node)) in (1u32..).zip(self.nodes.iter()) {
            let name = path.trim_start_matches('/');
            let (mode, data, rdev): (u32, &[u8], _) = match node {
                Node::Dir => (0o040755, &[], (0, 0)),
                Node::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Node::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Node::CharDev { major, minor, mode } => (0o020000 | mode, &[], (*major, *minor)),
            };
            len += write_entry(&mut w, ino, mode, name, data, rdev)?;
        }
        len += write_entry(&mut w, 0, 0, "TRAILER!!!", &[], (0, 0))?;
        w.write_all(&vec![0u8; (512 - len % 512) % 512])?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    pub fn write_file(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w)?;
        w.flush()?;
        Ok(())
    }
}

/// One newc entry; returns the bytes written.
fn write_entry(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<usize> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{z:08x}{z:08x}{major:08x}{minor:08x}{namesize:08x}{z:08x}",
        uid = 0,
        gid = 0,
        nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 },
        mtime = 0,
        size = data.len(),
        major = rdev.0,
        minor = rdev.1,
        z = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let head = pad4(w, 110 + namesize)?;
    w.write_all(data)?;
    Ok(110 + namesize + head + data.len() + pad4(w, data.len())?)
}

fn pad4(w: &mut impl Write, len: usize) -> Result<usize> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    Ok(pad)
}

/// The shared libraries (and the ELF interpreter) `ldd` says `prog` needs.
/// A static program needs none. A library that cannot be found is an error
/// naming it, because the program would fail in the guest with a less clear
/// message.
pub fn shared_libraries(prog: &Path) -> Result<Vec<PathBuf>> {
    let head = {
        use std::io::Read;
        let mut b = [0u8; 4];
        let mut f =
            std::fs::File::open(prog).with_context(|| format!("cannot open {}", prog.display()))?;
        let n = f.read(&mut b)?;
        b[..n].to_vec()
    };
    if head != b"\x7fELF" {
        return Ok(Vec::new()); // scripts and data files
    }
    let out = Command::new("ldd")
        .arg(prog)
        .output()
        .context("cannot run ldd (from libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable")
        || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
    {
        return Ok(Vec::new());
    }
    let mut libs = BTreeSet::new();
    let mut missing = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once("=>") {
            let rest = rest.trim();
            if rest.starts_with("not found") {
                missing.push(name.trim().to_string());
            } else if let Some(p) = rest
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                libs.insert(PathBuf::from(p));
            }
        } else if let Some(p) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libs.insert(PathBuf::from(p)); // the interpreter
        }
    }
    if !missing.is_empty() {
        return Err(anyhow!(
            "{} needs shared libraries that are not on this host: {}; install them or link the program statically",
            prog.display(),
            missing.join(", ")
        ));
    }
    Ok(libs.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut i = Initramfs::new();
        i.file("/etc/hostname", b"x\n".to_vec(), 0o644).unwrap();
        i.symlink("/bin/sh", "busybox").unwrap();
        let mut buf = Vec::new();
        i.write_to(&mut buf).unwrap();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(buf.len() % 4, 0);
        let s = String::from_utf8_lossy(&buf);
        assert!(s.contains("TRAILER!!!"));
        // parents were created: bin, etc, then the two entries
        assert!(s.contains("etc\0") && s.contains("bin\0"));
    }

    #[test]
    fn cpio_tool_reads_our_archive() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; the setup script installs it");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut i = Initramfs::new();
        i.file("/a/b/c.txt", b"hello".to_vec(), 0o600).unwrap();
        i.symlink("/a/link", "b/c.txt").unwrap();
        let arc = dir.path().join("x.cpio");
        i.write_file(&arc).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && cpio -id < x.cpio 2>&1 && cat a/link",
                dir.path().display()
            ))
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello"),
            "{out:?}"
        );
    }

    #[test]
    fn device_nodes_carry_their_numbers_and_the_archive_fills_blocks() {
        let mut i = Initramfs::new();
        i.char_dev("/dev/console", 5, 1, 0o600).unwrap();
        let buf = i.to_bytes().unwrap();
        assert_eq!(buf.len() % 512, 0);
        let s = String::from_utf8_lossy(&buf);
        // mode 020600, then rdevmajor 5 and rdevminor 1 in the header
        assert!(s.contains("00002180"), "{s}");
        assert!(s.contains("0000000500000001"), "{s}");
    }

    #[test]
    fn rejects_relative_and_dotdot() {
        let mut i = Initramfs::new();
        assert!(i.file("etc/x", vec![], 0o644).is_err());
        assert!(i.file("/etc/../x", vec![], 0o644).is_err());
    }

    #[test]
    fn static_program_needs_no_libraries() {
        let bb = Path::new("/bin/busybox");
        if bb.exists() {
            // Debian's busybox-static is linked statically
            assert!(shared_libraries(bb).unwrap().is_empty());
        }
        let ls = Path::new("/bin/ls");
        let libs = shared_libraries(ls).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }

    #[test]
    fn a_program_whose_library_is_gone_is_refused_by_name() {
        // A real dynamic program linked against a library we then delete:
        // what a user's test binary looks like when built on another host.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("lib.c"),
            "int livehost_answer(void) { return 42; }\n",
        )
        .unwrap();
        std::fs::write(
            d.join("main.c"),
            "int livehost_answer(void);\nint main(void) { return livehost_answer(); }\n",
        )
        .unwrap();
        let gcc = |args: &[&str]| {
            let st = Command::new("gcc")
                .args(args)
                .current_dir(d)
                .status()
                .expect("gcc (installed by ./x setup)");
            assert!(st.success(), "gcc {args:?}");
        };
        gcc(&["-shared", "-fPIC", "-o", "liblivehostgone.so", "lib.c"]);
        gcc(&["-o", "prog", "main.c", "-L.", "-llivehostgone"]);
        std::fs::remove_file(d.join("liblivehostgone.so")).unwrap();
        let e = shared_libraries(&d.join("prog")).unwrap_err().to_string();
        assert!(
            e.contains("liblivehostgone.so") && e.contains("not on this host"),
            "{e}"
        );
    }
}

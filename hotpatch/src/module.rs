//! Reading a kernel module file (`.ko`) without trusting it.
//!
//! Everything here works on bytes that may be truncated, random or hostile:
//! every offset is checked, nothing indexes without a bound, and a parse
//! failure is an error naming what was wrong, never a panic.
//!
//! The functions a livepatch replaces are not listed anywhere in the module's
//! metadata; they live in `struct klp_patch` / `klp_object` / `klp_func`
//! initialisers in a data section. Rather than hard-coding those structs'
//! sizes (they change between kernel versions and configs), we follow the
//! relocations that fill their pointer fields, relying only on the field order
//! that has been stable since 5.5: `klp_patch {mod, objs, states, replace}`,
//! `klp_object {name, funcs}`, `klp_func {old_name, new_func, old_sympos}`.

use anyhow::{Context, Result, bail};
use goblin::elf::{Elf, header, section_header, sym};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Trailer the kernel's sign-file appends after the signature.
pub const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature` that precedes the magic: algo, hash, id_type,
/// signer_len, key_id_len, pad[3], sig_len (big endian u32).
const SIG_INFO_LEN: usize = 12;
/// Section index the kernel reserves for livepatch symbols (`.klp.sym.*`).
pub const SHN_LIVEPATCH: u32 = 0xff20;
/// Offset of `name` in `struct module` on 64-bit kernels: after
/// `enum module_state state` (padded to 8) and `struct list_head list`.
const THIS_MODULE_NAME_OFFSET: usize = 24;
/// `MODULE_NAME_LEN` (64 - sizeof(unsigned long)).
const MODULE_NAME_LEN: usize = 56;
/// Longest string we accept from a module's string tables.
const MAX_STR: usize = 512;
/// Bigger than any module we expect; keeps a wrong path from eating memory.
pub const MAX_MODULE_SIZE: u64 = 256 << 20;
/// The klp struct walk gives up after this many bytes without an entry: a
/// `klp_object`/`klp_func` is far smaller, so a longer gap means we left the
/// array (or the section size is made up).
const MAX_GAP: u64 = 1024;
/// Entries read from one array.
const MAX_ARRAY_ENTRIES: usize = 1024;
/// Functions reported for the whole patch.
const MAX_FUNCTIONS: usize = 4096;
/// `__this_module` pointers tried as the start of a `klp_patch`.
const MAX_PATCH_CANDIDATES: usize = 64;
/// Data relocations kept (a 256 MiB file could hold ten million).
const MAX_RELOCS: usize = 1 << 20;

/// The relocation type of a plain 64-bit absolute pointer (what fills the
/// klp structs' pointer fields) on the architectures with livepatch.
fn abs64_reloc_type(machine: u16) -> Option<u32> {
    match machine {
        header::EM_X86_64 => Some(1),    // R_X86_64_64
        header::EM_AARCH64 => Some(257), // R_AARCH64_ABS64
        header::EM_PPC64 => Some(38),    // R_PPC64_ADDR64
        header::EM_S390 => Some(22),     // R_390_64
        header::EM_RISCV => Some(2),     // R_RISCV_64
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Signature {
    /// `PKCS#7` for every kernel since 4.x; other ids are reported raw.
    pub id_type: String,
    pub signature_len: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatchedFunction {
    /// The kernel function being replaced (`klp_func.old_name`).
    pub name: String,
    /// Which of several same-named symbols (0 = the only one).
    pub sympos: u64,
    /// The module's replacement function, when its symbol could be named.
    pub replacement: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatchedObject {
    /// `vmlinux` or the name of the module being patched.
    pub name: String,
    pub functions: Vec<PatchedFunction>,
}

/// A `.klp.sym.<object>.<name>,<sympos>` symbol: a reference the kernel
/// resolves when the patched object is present (klp-convert/kpatch output).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KlpSymbol {
    pub object: String,
    pub name: String,
    pub sympos: u64,
}

/// Everything `inspect` reports about a module file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub size: u64,
    pub sha256: String,
    /// From `.gnu.linkonce.this_module` (what the kernel will call it), else
    /// from modinfo `name=`.
    pub name: Option<String>,
    /// The first `vermagic=` entry: the one the kernel checks.
    pub vermagic: Option<String>,
    pub livepatch: bool,
    pub license: Option<String>,
    pub depends: Vec<String>,
    pub srcversion: Option<String>,
    pub description: Option<String>,
    /// The file is a compressed module (`.ko.xz`, `.ko.zst`); everything
    /// else here is read from the ELF inside, `sha256` and `size` are the
    /// file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::compressed::Compression>,
    /// `MODULE_VERSION`.
    #[serde(default)]
    pub version: Option<String>,
    /// CVE ids the patch fixes: modinfo `cve=` entries (comma or space
    /// separated; `MODULE_INFO(cve, "CVE-2024-1086")`) and any named in the
    /// description.
    #[serde(default)]
    pub cves: Vec<String>,
    pub signature: Option<Signature>,
    /// `klp_patch.replace` (atomic replace), when the patch struct was found.
    pub replace: Option<bool>,
    pub objects: Vec<PatchedObject>,
    /// Objects named by `.klp.rela.<object>.<section>` sections.
    pub klp_rela_objects: Vec<String>,
    pub klp_symbols: Vec<KlpSymbol>,
    /// Every modinfo key=value pair, in file order.
    pub modinfo: Vec<(String, String)>,
    /// Things that are odd but not fatal (duplicate vermagic, a patch struct
    /// that could not be followed, ...).
    pub warnings: Vec<String>,
}

impl ModuleInfo {
    pub fn modinfo_all(&self, key: &str) -> Vec<&str> {
        self.modinfo
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every (object, function) this module replaces.
    pub fn functions(&self) -> impl Iterator<Item = (&str, &PatchedFunction)> {
        self.objects
            .iter()
            .flat_map(|o| o.functions.iter().map(move |f| (o.name.as_str(), f)))
    }
}

/// The patch's own description, version and CVE ids: shown by inspect,
/// list and status, kept in the manifest and the load record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatchMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cves: Vec<String>,
}

impl ModuleInfo {
    pub fn meta(&self) -> PatchMeta {
        PatchMeta {
            description: self.description.clone(),
            version: self.version.clone(),
            cves: self.cves.clone(),
        }
    }
}

/// `CVE-YYYY-N…` ids in modinfo `cve=` entries and the description, in
/// order, each once; anything else in those strings is ignored.
fn cve_ids(modinfo: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let texts = modinfo
        .iter()
        .filter(|(k, _)| k == "cve" || k == "description")
        .map(|(_, v)| v.as_str());
    for t in texts {
        for w in t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            let w = w.to_ascii_uppercase();
            let mut parts = w.splitn(3, '-');
            let ok = parts.next() == Some("CVE")
                && parts
                    .next()
                    .is_some_and(|y| y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()))
                && parts.next().is_some_and(|n| {
                    (4..=8).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit())
                });
            if ok && !out.contains(&w) && out.len() < 64 {
                out.push(w);
            }
        }
    }
    out
}

/// A module file opened once: the bytes that are hashed and inspected are
/// read from this descriptor, and `finit_module` loads through the same
/// one, so a file swapped after the check is never what gets loaded.
pub struct OpenedModule {
    pub file: std::fs::File,
    /// The file's bytes: what is hashed, recorded and installed.
    pub bytes: Vec<u8>,
    /// `.ko.xz`/`.ko.zst`: the container, and the ELF it holds.
    pub compressed: Option<(crate::compressed::Compression, Vec<u8>)>,
}

/// Open `path` without following a symbolic link (nor blocking on a FIFO),
/// insist on a regular file of at most [`MAX_MODULE_SIZE`], and read it.
pub fn open_module(path: &Path) -> Result<OpenedModule> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!(
                "{} is a symbolic link; hotpatch opens module files without following links, so the file checked is the file loaded (name the file itself)",
                path.display()
            ),
            _ => anyhow::anyhow!("cannot open {}: {e}", path.display()),
        })?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let too_big = |n: u64| {
        anyhow::anyhow!(
            "{} is {n} bytes, more than the {} MiB any kernel module should be",
            path.display(),
            MAX_MODULE_SIZE >> 20
        )
    };
    if meta.len() > MAX_MODULE_SIZE {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file)
        .take(MAX_MODULE_SIZE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_MODULE_SIZE {
        return Err(too_big(bytes.len() as u64));
    }
    // A signature is appended after compression: the container is what
    // precedes it.
    let payload = split_signature(&bytes).map_or(&bytes[..], |(p, _)| p);
    let compressed = match crate::compressed::Compression::detect(payload) {
        Some(c) => {
            let elf = crate::compressed::decompress(c, payload, MAX_MODULE_SIZE)
                .with_context(|| format!("{} is a {c:?}-compressed module", path.display()))?;
            Some((c, elf))
        }
        None => None,
    };
    Ok(OpenedModule {
        file,
        bytes,
        compressed,
    })
}

/// Read and inspect a module file ([`open_module`]).
pub fn inspect_file(path: &Path) -> Result<ModuleInfo> {
    inspect_opened(path, &open_module(path)?)
}

/// Inspect the bytes of an opened module file.
pub fn inspect_opened(path: &Path, m: &OpenedModule) -> Result<ModuleInfo> {
    let usable = || format!("{} is not a usable kernel module", path.display());
    let Some((c, elf)) = &m.compressed else {
        return inspect(&m.bytes).with_context(usable);
    };
    let mut info = inspect(elf).with_context(usable)?;
    // The file is the module's identity (what install stores, what the
    // manifest and the load record name); the signature, if any, is on it.
    info.sha256 = sha256_hex(&m.bytes);
    info.size = m.bytes.len() as u64;
    info.compression = Some(*c);
    if let Ok((_, sig)) = split_signature(&m.bytes) {
        info.signature = sig;
    }
    Ok(info)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Split off an appended signature, returning the ELF part.
fn split_signature(bytes: &[u8]) -> Result<(&[u8], Option<Signature>)> {
    if !bytes.ends_with(SIG_MAGIC) {
        return Ok((bytes, None));
    }
    let before_magic = bytes.len() - SIG_MAGIC.len();
    let info_start = before_magic.checked_sub(SIG_INFO_LEN).context(
        "file ends with the module-signature marker but is too short to hold a signature",
    )?;
    let info = &bytes[info_start..before_magic];
    let id_type = info[2];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]);
    let elf_len = info_start.checked_sub(sig_len as usize).with_context(|| {
        format!("signature trailer claims {sig_len} bytes but only {info_start} precede it")
    })?;
    let id_type = match id_type {
        0 => "PGP".to_string(),
        1 => "X.509".to_string(),
        2 => "PKCS#7".to_string(),
        n => format!("unknown ({n})"),
    };
    Ok((
        &bytes[..elf_len],
        Some(Signature {
            id_type,
            signature_len: sig_len,
        }),
    ))
}

/// Parse with goblin. goblin aims never to panic, but this is the one place
/// fully untrusted bytes meet third-party code, so a panic there is turned
/// into an error instead of taking the whole process (or a daemon) down.
fn parse_elf(bytes: &[u8]) -> Result<Elf<'_>> {
    match std::panic::catch_unwind(|| Elf::parse(bytes)) {
        Ok(Ok(elf)) => Ok(elf),
        Ok(Err(e)) => bail!("malformed ELF: {e}"),
        Err(_) => bail!("malformed ELF: the ELF parser gave up on it"),
    }
}

/// Inspect module bytes.
pub fn inspect(bytes: &[u8]) -> Result<ModuleInfo> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file (it does not start with \\x7fELF)");
    }
    let (elf_bytes, signature) = split_signature(bytes)?;
    let elf = parse_elf(elf_bytes)?;
    if elf.header.e_type != header::ET_REL {
        bail!(
            "ELF type is {}, but kernel modules are relocatable objects (ET_REL)",
            header::et_to_str(elf.header.e_type)
        );
    }
    let view = View::new(&elf, elf_bytes);

    let modinfo_idx = view
        .section_by_name(".modinfo")
        .context("no .modinfo section: this is an object file, not a kernel module (.ko)")?;
    let modinfo = parse_modinfo(view.data(modinfo_idx).unwrap_or(&[]));
    let first = |k: &str| {
        modinfo
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };

    let mut warnings = Vec::new();
    let vermagics = modinfo.iter().filter(|(k, _)| k == "vermagic").count();
    if vermagics > 1 {
        warnings.push(format!(
            "modinfo holds {vermagics} vermagic entries; the kernel checks only the first"
        ));
    }

    let name = module_name(&view, first("name"), &mut warnings);
    let (klp_rela_objects, klp_symbols) = view.klp_sections();
    let livepatch = first("livepatch").as_deref() == Some("Y");
    let (replace, objects) = patched_objects(&view, livepatch, &mut warnings);

    Ok(ModuleInfo {
        size: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        name,
        vermagic: first("vermagic"),
        livepatch,
        license: first("license"),
        depends: first("depends")
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        srcversion: first("srcversion"),
        description: first("description"),
        compression: None,
        version: first("version"),
        cves: cve_ids(&modinfo),
        signature,
        replace,
        objects,
        klp_rela_objects,
        klp_symbols,
        modinfo,
        warnings,
    })
}

/// The module's name: `struct module`'s, else modinfo's. The name becomes
/// a file name under the state dir and a sysfs path, so only what the
/// kernel itself accepts as a module name is taken.
fn module_name(
    view: &View,
    modinfo_name: Option<String>,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let this_module_name = view
        .section_by_name(".gnu.linkonce.this_module")
        .and_then(|i| view.data(i))
        .and_then(|d| d.get(THIS_MODULE_NAME_OFFSET..))
        .and_then(|d| c_string(&d[..d.len().min(MODULE_NAME_LEN)]))
        .filter(|s| is_module_name(s));
    if let Some(n) = &modinfo_name
        && !is_module_name(n)
    {
        warnings.push(format!(
            "modinfo name {n:?} is not a valid module name; ignored"
        ));
    }
    let modinfo_name = modinfo_name.filter(|s| is_module_name(s));
    if let (Some(a), Some(b)) = (&this_module_name, &modinfo_name)
        && a != b
    {
        warnings.push(format!(
            "module name differs: struct module says {a:?}, modinfo says {b:?}"
        ));
    }

    this_module_name.or(modinfo_name)
}

/// What the patch replaces: the klp_patch structure's objects, or for a
/// kpatch-build module (which builds its klp_patch at run time) its
/// `.kpatch.funcs` metadata; `replace` where the structure says.
fn patched_objects(
    view: &View,
    livepatch: bool,
    warnings: &mut Vec<String>,
) -> (Option<bool>, Vec<PatchedObject>) {
    let kpatch = view.kpatch_funcs();
    match view.klp_patch() {
        Ok((r, objs)) if !objs.is_empty() || kpatch.is_empty() => (r, objs),
        // A kpatch-build module: its metadata says what it patches;
        // `replace` is only known once loaded (sysfs, 6.11+).
        Ok(_) => (None, kpatch),
        Err(_) if !kpatch.is_empty() => (None, kpatch),
        Err(e) => {
            if livepatch {
                warnings.push(format!("could not follow the klp_patch structure: {e}"));
            }
            (None, Vec::new())
        }
    }
}

fn parse_modinfo(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A NUL-terminated string at the start of `data`, if it has a terminator
/// within `MAX_STR` bytes and is printable.
fn c_string(data: &[u8]) -> Option<String> {
    let end = data.iter().take(MAX_STR).position(|&b| b == 0)?;
    let s = std::str::from_utf8(&data[..end]).ok()?;
    if s.chars().all(|c| !c.is_control()) {
        Some(s.to_string())
    } else {
        None
    }
}

/// A kernel module name: 1 to 55 (`MODULE_NAME_LEN - 1`) characters of
/// `[A-Za-z0-9_-]`. Everything hotpatch builds a path from passes this.
pub fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() < MODULE_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where a relocated pointer points.
#[derive(Debug, Clone)]
enum Target {
    /// Into one of the module's sections.
    Local { section: usize, offset: u64 },
    /// An undefined symbol the kernel resolves at load (e.g. `__this_module`
    /// is defined, but `printk` is not).
    Extern(String),
}

struct View<'a> {
    elf: &'a Elf<'a>,
    bytes: &'a [u8],
    /// (section, offset) -> target, for relocations applied to allocated data.
    relocs: HashMap<(usize, u64), Target>,
    /// Named defined symbols by (section, value), for naming targets.
    names: HashMap<(usize, u64), String>,
    /// Defined object symbols by section: (value, size), to bound arrays.
    objects: HashMap<usize, Vec<(u64, u64)>>,
    this_module: Option<(usize, u64)>,
}

impl<'a> View<'a> {
    fn new(elf: &'a Elf<'a>, bytes: &'a [u8]) -> Self {
        let nsec = elf.section_headers.len();
        let mut names = HashMap::new();
        let mut objects: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        let mut this_module = None;
        for s in elf.syms.iter() {
            let shndx = s.st_shndx;
            if shndx == section_header::SHN_UNDEF as usize || shndx >= nsec {
                continue;
            }
            let Some(name) = elf.strtab.get_at(s.st_name) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            match s.st_type() {
                sym::STT_FUNC => {
                    names.insert((shndx, s.st_value), name.to_string());
                }
                sym::STT_OBJECT => {
                    objects
                        .entry(shndx)
                        .or_default()
                        .push((s.st_value, s.st_size));
                    if name == "__this_module" {
                        this_module = Some((shndx, s.st_value));
                    }
                }
                _ => {}
            }
        }
        let mut v = View {
            elf,
            bytes,
            relocs: HashMap::new(),
            names,
            objects,
            this_module,
        };
        v.relocs = v.collect_relocs();
        v
    }

    fn section_name(&self, idx: usize) -> Option<&'a str> {
        let sh = self.elf.section_headers.get(idx)?;
        self.elf.shdr_strtab.get_at(sh.sh_name)
    }

    fn section_by_name(&self, name: &str) -> Option<usize> {
        (0..self.elf.section_headers.len()).find(|&i| self.section_name(i) == Some(name))
    }

    /// A section's bytes, if it has file contents inside the buffer.
    fn data(&self, idx: usize) -> Option<&'a [u8]> {
        let sh = self.elf.section_headers.get(idx)?;
        if sh.sh_type == section_header::SHT_NOBITS {
            return None;
        }
        let start = usize::try_from(sh.sh_offset).ok()?;
        let len = usize::try_from(sh.sh_size).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    fn collect_relocs(&self) -> HashMap<(usize, u64), Target> {
        let mut out = HashMap::new();
        let abs64 = abs64_reloc_type(self.elf.header.e_machine);
        if abs64.is_none() {
            return out;
        }
        for (rel_idx, relocs) in &self.elf.shdr_relocs {
            let Some(sh) = self.elf.section_headers.get(*rel_idx) else {
                continue;
            };
            let target_sec = sh.sh_info as usize;
            let Some(target) = self.elf.section_headers.get(target_sec) else {
                continue;
            };
            // Only data the kernel keeps in memory can hold klp structs; the
            // livepatch-specific .klp.rela.* sections are resolved by the
            // kernel later and are reported separately.
            if target.sh_flags & u64::from(section_header::SHF_ALLOC) == 0 {
                continue;
            }
            if self
                .section_name(*rel_idx)
                .is_some_and(|n| n.starts_with(".klp.rela."))
            {
                continue;
            }
            // Code is never part of a klp struct, and its relocations
            // (PC-relative, with negative addends) are not pointers to
            // follow.
            if target.sh_flags & u64::from(section_header::SHF_EXECINSTR) != 0 {
                continue;
            }
            // Only relocations that can land inside the section's real bytes.
            let Some(target_len) = self.data(target_sec).map(|d| d.len() as u64) else {
                continue;
            };
            for r in relocs.iter() {
                // The klp structs' pointer fields are plain 64-bit absolute
                // relocations; anything else is not a field we read.
                if Some(r.r_type) != abs64 {
                    continue;
                }
                if r.r_offset.checked_add(8).is_none_or(|end| end > target_len) {
                    continue;
                }
                if out.len() >= MAX_RELOCS {
                    return out;
                }
                let Some(s) = self.elf.syms.get(r.r_sym) else {
                    continue;
                };
                let addend = r.r_addend.unwrap_or(0);
                let t = if s.st_type() == sym::STT_SECTION {
                    let Ok(offset) = u64::try_from(addend) else {
                        continue;
                    };
                    Target::Local {
                        section: s.st_shndx,
                        offset,
                    }
                } else if s.st_shndx != section_header::SHN_UNDEF as usize
                    && s.st_shndx < self.elf.section_headers.len()
                {
                    let Some(offset) = s.st_value.checked_add_signed(addend) else {
                        continue;
                    };
                    Target::Local {
                        section: s.st_shndx,
                        offset,
                    }
                } else {
                    let name = self.elf.strtab.get_at(s.st_name).unwrap_or("?");
                    Target::Extern(name.to_string())
                };
                out.insert((target_sec, r.r_offset), t);
            }
        }
        out
    }

    fn flags(&self, idx: usize) -> u64 {
        self.elf.section_headers.get(idx).map_or(0, |s| s.sh_flags)
    }

    /// The string a relocation points at, if it points into a string section.
    fn string_at(&self, t: &Target) -> Option<String> {
        let Target::Local { section, offset } = t else {
            return None;
        };
        let name = self.section_name(*section)?;
        let strings = self.flags(*section) & u64::from(section_header::SHF_STRINGS) != 0
            || name.starts_with(".rodata")
            || name == ".kpatch.strings";
        if !strings {
            return None;
        }
        let data = self.data(*section)?;
        c_string(data.get(usize::try_from(*offset).ok()?..)?)
    }

    /// The function a relocation points at, if it points into code.
    fn function_at(&self, t: &Target) -> Option<String> {
        match t {
            Target::Local { section, offset } => {
                if self.flags(*section) & u64::from(section_header::SHF_EXECINSTR) == 0 {
                    return None;
                }
                Some(
                    self.names
                        .get(&(*section, *offset))
                        .cloned()
                        .unwrap_or_else(|| {
                            format!(
                                "{}+{:#x}",
                                self.section_name(*section).unwrap_or("?"),
                                offset
                            )
                        }),
                )
            }
            Target::Extern(n) => Some(n.clone()),
        }
    }

    fn u64_at(&self, section: usize, offset: u64) -> Option<u64> {
        let d = self.data(section)?;
        let o = usize::try_from(offset).ok()?;
        let b: [u8; 8] = d.get(o..o.checked_add(8)?)?.try_into().ok()?;
        Some(if self.elf.little_endian {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }

    /// `klp_func` entries start where a string pointer is followed by a code
    /// pointer.
    fn is_func_entry(&self, section: usize, off: u64) -> bool {
        let Some(next) = off.checked_add(8) else {
            return false;
        };
        let name = self
            .relocs
            .get(&(section, off))
            .and_then(|t| self.string_at(t));
        let func = self
            .relocs
            .get(&(section, next))
            .and_then(|t| self.function_at(t));
        name.is_some() && func.is_some()
    }

    /// The pointer relocated into `section` at `off + delta`.
    fn reloc_at(&self, section: usize, off: u64, delta: u64) -> Option<&Target> {
        self.relocs.get(&(section, off.checked_add(delta)?))
    }

    /// End of the array starting at `start`: the size of the object symbol
    /// there when the module kept one, else the end of the section; never
    /// past the section's bytes actually present in the file.
    fn array_end(&self, section: usize, start: u64) -> u64 {
        let data_len = self.data(section).map_or(0, |d| d.len() as u64);
        self.objects
            .get(&section)
            .and_then(|v| v.iter().find(|(val, _)| *val == start))
            .map_or(u64::MAX, |(v, s)| v.saturating_add(*s))
            .min(data_len)
    }

    /// Entries of an array at (section, start) matching `is_entry`, walking
    /// 8-byte steps: arrays end with a zeroed terminator, so we stop at the
    /// first gap wider than the stride the first two entries establish, and
    /// after `MAX_GAP` bytes with no entry at all (from the start or since
    /// the last entry), so a walk is bounded whatever the section claims.
    fn array_entries(
        &self,
        section: usize,
        start: u64,
        is_entry: impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let end = self.array_end(section, start);
        let mut found: Vec<u64> = Vec::new();
        let mut off = start;
        while off < end && found.len() < MAX_ARRAY_ENTRIES {
            let last = found.last().copied().unwrap_or(start);
            if off - last > MAX_GAP {
                break;
            }
            if is_entry(off) {
                if found.len() >= 2 {
                    let stride = found[1] - found[0];
                    if off - last != stride {
                        break;
                    }
                }
                found.push(off);
            }
            let Some(next) = off.checked_add(8) else {
                break;
            };
            off = next;
        }
        found
    }

    /// kpatch-build's metadata (its modules build `klp_patch` at run time,
    /// so there is no initialiser to follow): `.kpatch.funcs` holds
    /// `struct kpatch_patch_func { new_addr, new_size, old_addr, old_size,
    /// sympos, name, objname }` (7 × 8 bytes); `name` and `objname` are
    /// relocated to strings in `.kpatch.strings`, `new_addr` to the
    /// replacement function. Bounded by the section's bytes and
    /// [`MAX_FUNCTIONS`].
    fn kpatch_funcs(&self) -> Vec<PatchedObject> {
        const ENTRY: u64 = 56;
        let Some(sec) = self.section_by_name(".kpatch.funcs") else {
            return Vec::new();
        };
        let len = self.data(sec).map_or(0, |d| d.len() as u64);
        let mut objects: Vec<PatchedObject> = Vec::new();
        let mut n = 0;
        let mut off = 0u64;
        while off.saturating_add(ENTRY) <= len && n < MAX_FUNCTIONS {
            let name = self.reloc_at(sec, off, 40).and_then(|t| self.string_at(t));
            let obj = self.reloc_at(sec, off, 48).and_then(|t| self.string_at(t));
            if let (Some(name), Some(obj)) = (name, obj) {
                n += 1;
                let f = PatchedFunction {
                    name,
                    sympos: self.u64_at(sec, off + 32).unwrap_or(0),
                    replacement: self.reloc_at(sec, off, 0).and_then(|t| self.function_at(t)),
                };
                match objects.iter_mut().find(|o| o.name == obj) {
                    Some(o) => o.functions.push(f),
                    None => objects.push(PatchedObject {
                        name: obj,
                        functions: vec![f],
                    }),
                }
            }
            off += ENTRY;
        }
        objects
    }

    /// Find `struct klp_patch` (its `mod` field points at `__this_module`
    /// and its `objs` at an array of objects) and walk it.
    fn klp_patch(&self) -> Result<(Option<bool>, Vec<PatchedObject>)> {
        let this_module = self.this_module.context("no __this_module symbol")?;
        let mut candidates: Vec<(usize, u64)> = self
            .relocs
            .iter()
            .filter(|(_, t)| {
                matches!(t, Target::Local { section, offset } if (*section, *offset) == this_module)
            })
            .map(|(k, _)| *k)
            .collect();
        candidates.sort();
        // A real module has one klp_patch; a crafted one may point at
        // __this_module from everywhere, so only the first few are tried.
        for (sec, p) in candidates.into_iter().take(MAX_PATCH_CANDIDATES) {
            let Some(Target::Local {
                section: osec,
                offset: objs,
            }) = self.reloc_at(sec, p, 8)
            else {
                continue;
            };
            let (osec, objs) = (*osec, *objs);
            let is_obj = |off: u64| match self.reloc_at(osec, off, 8) {
                Some(Target::Local { section, offset }) => self.is_func_entry(*section, *offset),
                _ => false,
            };
            let obj_offs = self.array_entries(osec, objs, is_obj);
            if obj_offs.is_empty() {
                continue;
            }
            let mut objects = Vec::new();
            // Bounds the whole walk: objects x functions stays small even
            // when every object points at the same long array.
            let mut budget = MAX_FUNCTIONS;
            for o in obj_offs {
                if budget == 0 {
                    break;
                }
                let name = self
                    .relocs
                    .get(&(osec, o))
                    .and_then(|t| self.string_at(t))
                    .unwrap_or_else(|| "vmlinux".to_string());
                let Some(Target::Local {
                    section: fsec,
                    offset: fstart,
                }) = self.reloc_at(osec, o, 8)
                else {
                    continue;
                };
                let (fsec, fstart) = (*fsec, *fstart);
                let functions: Vec<PatchedFunction> = self
                    .array_entries(fsec, fstart, |off| self.is_func_entry(fsec, off))
                    .into_iter()
                    .take(budget)
                    .filter_map(|f| {
                        let name = self
                            .relocs
                            .get(&(fsec, f))
                            .and_then(|t| self.string_at(t))?;
                        let replacement =
                            self.reloc_at(fsec, f, 8).and_then(|t| self.function_at(t));
                        Some(PatchedFunction {
                            name,
                            sympos: f
                                .checked_add(16)
                                .and_then(|at| self.u64_at(fsec, at))
                                .unwrap_or(0),
                            replacement,
                        })
                    })
                    .collect();
                budget = budget.saturating_sub(functions.len().max(1));
                objects.push(PatchedObject { name, functions });
            }
            // `replace` is the bool after mod, objs and states.
            let replace = self
                .data(sec)
                .and_then(|d| d.get(usize::try_from(p).ok()?.checked_add(24)?))
                .map(|&b| b != 0);
            return Ok((replace, objects));
        }
        bail!("no struct klp_patch (a THIS_MODULE pointer followed by an objects array) found")
    }

    /// Objects named by `.klp.rela.*` sections and `.klp.sym.*` symbols.
    fn klp_sections(&self) -> (Vec<String>, Vec<KlpSymbol>) {
        let mut objs = BTreeMap::new();
        for i in 0..self.elf.section_headers.len() {
            if let Some(rest) = self
                .section_name(i)
                .and_then(|n| n.strip_prefix(".klp.rela."))
                && let Some((obj, _)) = rest.split_once('.')
            {
                objs.insert(obj.to_string(), ());
            }
        }
        let mut syms = Vec::new();
        for s in self.elf.syms.iter() {
            if s.st_shndx != SHN_LIVEPATCH as usize {
                continue;
            }
            let Some(rest) = self
                .elf
                .strtab
                .get_at(s.st_name)
                .and_then(|n| n.strip_prefix(".klp.sym."))
            else {
                continue;
            };
            let Some((obj, namepos)) = rest.split_once('.') else {
                continue;
            };
            let (name, pos) = namepos.rsplit_once(',').unwrap_or((namepos, "0"));
            syms.push(KlpSymbol {
                object: obj.to_string(),
                name: name.to_string(),
                sympos: pos.parse().unwrap_or(0),
            });
        }
        (objs.into_keys().collect(), syms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny xorshift so the "random bytes" cases are reproducible.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The smallest ELF64 header goblin accepts: no sections at all.
    fn elf_header(e_type: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64-bit
        h[5] = 1; // little endian
        h[6] = 1; // version
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        h[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        h
    }

    #[test]
    fn empty_is_named() {
        let e = inspect(&[]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn not_elf_is_named() {
        let e = inspect(b"#!/bin/sh\necho hi\n").unwrap_err().to_string();
        assert!(e.contains("not an ELF"), "{e}");
    }

    #[test]
    fn executables_are_not_modules() {
        let e = format!("{:#}", inspect(&elf_header(2)).unwrap_err());
        assert!(e.contains("ET_REL"), "{e}");
    }

    #[test]
    fn relocatable_without_modinfo_is_an_object_file() {
        let e = format!("{:#}", inspect(&elf_header(1)).unwrap_err());
        assert!(e.contains(".modinfo"), "{e}");
    }

    #[test]
    fn random_and_truncated_bytes_never_panic() {
        for seed in 0..300u64 {
            let mut b = noise(seed, (seed as usize * 37) % 4096);
            let _ = inspect(&b);
            // Also with a valid-looking ELF header in front, which gets the
            // bytes past the magic check and into the section parser.
            let h = elf_header(1 + (seed % 2) as u16);
            let n = h.len().min(b.len());
            b[..n].copy_from_slice(&h[..n]);
            let _ = inspect(&b);
            for cut in [0, 1, 4, 16, 63, 64] {
                let _ = inspect(&b[..cut.min(b.len())]);
            }
        }
    }

    #[test]
    fn bogus_signature_trailer_is_an_error() {
        let mut b = elf_header(1);
        b.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        b.extend_from_slice(SIG_MAGIC);
        let e = inspect(&b).unwrap_err().to_string();
        assert!(e.contains("signature trailer claims"), "{e}");
        let e = inspect(SIG_MAGIC).unwrap_err().to_string();
        assert!(e.contains("not an ELF"), "{e}");
    }

    #[test]
    fn modinfo_pairs() {
        let m = parse_modinfo(b"license=GPL\0\0vermagic=6.1 SMP \0junk\0name=hp_x\0");
        assert_eq!(
            m,
            vec![
                ("license".to_string(), "GPL".to_string()),
                ("vermagic".to_string(), "6.1 SMP ".to_string()),
                ("name".to_string(), "hp_x".to_string()),
            ]
        );
    }

    use crate::testelf::{self, ModuleSpec, Object, Reloc, Sec, Sym};
    use std::time::{Duration, Instant};

    fn quick(bytes: &[u8]) -> Result<ModuleInfo> {
        let t = Instant::now();
        let r = inspect(bytes);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "inspect took {:?}",
            t.elapsed()
        );
        r
    }

    fn two_objects() -> ModuleSpec {
        ModuleSpec::livepatch(
            "hp_gen",
            &[
                Object {
                    name: None,
                    funcs: vec![
                        ("cmdline_proc_show".into(), 0),
                        ("version_proc_show".into(), 2),
                    ],
                },
                Object {
                    name: Some("hp_busy".into()),
                    funcs: vec![("hp_busy_sleeper".into(), 0)],
                },
            ],
            true,
        )
    }

    #[test]
    fn generated_livepatch_is_followed() {
        let i = quick(&two_objects().build().bytes).unwrap();
        assert_eq!(i.name.as_deref(), Some("hp_gen"));
        assert!(i.livepatch);
        assert_eq!(i.replace, Some(true));
        assert!(i.warnings.is_empty(), "{:?}", i.warnings);
        let fs: Vec<(&str, &str, u64, Option<&str>)> = i
            .functions()
            .map(|(o, f)| (o, f.name.as_str(), f.sympos, f.replacement.as_deref()))
            .collect();
        assert_eq!(
            fs,
            [
                (
                    "vmlinux",
                    "cmdline_proc_show",
                    0,
                    Some("hp_gen_cmdline_proc_show")
                ),
                (
                    "vmlinux",
                    "version_proc_show",
                    2,
                    Some("hp_gen_version_proc_show")
                ),
                (
                    "hp_busy",
                    "hp_busy_sleeper",
                    0,
                    Some("hp_gen_hp_busy_sleeper")
                ),
            ]
        );
    }

    /// What 16 Debian modules (vsock, nf_tables, nfsd, aesni-intel, ...)
    /// have: code that loads `__this_module`, with PC-relative relocations
    /// and negative addends next to it. Following those wrapped offsets
    /// overflowed; code relocations are now not followed at all.
    #[test]
    fn code_relocations_with_negative_addends_are_ignored() {
        let mut m = two_objects();
        m.text.extend_from_slice(&[0x90; 0x40]);
        let base = m.text.len() as u64 - 0x40;
        m.text_relocs.extend([
            Reloc {
                offset: base + 1,
                sym: Sym::ThisModule,
                kind: testelf::R_X86_64_32S,
                addend: 0,
            },
            Reloc {
                offset: base + 9,
                sym: Sym::Section(Sec::Text),
                kind: testelf::R_X86_64_32S,
                addend: base as i64 + 0x20,
            },
            Reloc {
                offset: base + 0x28,
                sym: Sym::Section(Sec::Rodata),
                kind: testelf::R_X86_64_PC32,
                addend: -4,
            },
            Reloc {
                offset: base + 0x30,
                sym: Sym::Func(0),
                kind: testelf::R_X86_64_PC32,
                addend: -4,
            },
        ]);
        let i = quick(&m.build().bytes).unwrap();
        assert_eq!(i.functions().count(), 3);
    }

    /// Negative addends and non-pointer relocation types in data: skipped,
    /// never wrapped into huge offsets.
    #[test]
    fn data_relocations_never_wrap() {
        let mut m = two_objects();
        m.data.extend_from_slice(&[0; 0x20]);
        let at = m.data.len() as u64 - 0x20;
        m.data_relocs.extend([
            Reloc::abs64(at, Sym::Section(Sec::Data), -8),
            Reloc::abs64(at + 8, Sym::Func(0), i64::MIN),
            Reloc::abs64(at + 16, Sym::ThisModule, 0),
            Reloc {
                offset: at + 24,
                sym: Sym::Section(Sec::Data),
                kind: testelf::R_X86_64_PC32,
                addend: -4,
            },
        ]);
        let i = quick(&m.build().bytes).unwrap();
        assert_eq!(i.functions().count(), 3);
        // The same with every addend of the klp structs made negative.
        let mut b = two_objects().build();
        for n in 0..9 {
            b.set_data_reloc_addend(n, -(n as i64) - 1);
        }
        let i = quick(&b.bytes).unwrap();
        assert_eq!(i.functions().count(), 0);
    }

    /// /tmp/hp_ovf.ko: a `.rela.data` entry whose r_offset is near u64::MAX
    /// (the relocation that points at `__this_module`).
    #[test]
    fn relocation_offset_near_u64_max_is_no_panic() {
        for off in [u64::MAX, u64::MAX - 3, u64::MAX - 8, u64::MAX - 16, 1 << 63] {
            for n in 0..3 {
                let mut b = two_objects().build();
                b.set_data_reloc_offset(n, off);
                let i = quick(&b.bytes).unwrap();
                assert!(i.livepatch);
            }
        }
    }

    /// /tmp/hp_hang.ko: `.data`'s sh_size claims 1 TiB and the objects
    /// pointer points past the real bytes. The walk is bounded by the bytes
    /// the file holds.
    #[test]
    fn made_up_section_size_does_not_hang() {
        for size in [1u64 << 40, u64::MAX, u64::MAX - 7] {
            let mut b = two_objects().build();
            b.set_data_size(size);
            b.set_data_reloc_addend(1, 0x1000);
            let i = quick(&b.bytes).unwrap();
            assert!(i.objects.is_empty());
            assert!(i.warnings.iter().any(|w| w.contains("klp_patch")));
        }
        // A real (large) .data with the objects pointer into a long run of
        // zeros: the walk stops after a bounded gap.
        let mut m = two_objects();
        let at = m.data.len() as i64;
        m.data.resize(m.data.len() + (8 << 20), 0);
        m.data_relocs[1].addend = at;
        let i = quick(&m.build().bytes).unwrap();
        assert!(i.objects.is_empty());
    }

    /// Every object pointing at one long functions array: the total is
    /// capped, so objects x functions cannot blow up.
    #[test]
    fn objects_times_functions_is_bounded() {
        let funcs: Vec<(String, u64)> = (0..2000).map(|i| (format!("f{i}"), 0)).collect();
        let mut m = ModuleSpec::livepatch("hp_many", &[Object { name: None, funcs }], false);
        // 1000 more objects, all pointing at the first object's functions.
        let funcs_at = m.data_relocs[2].addend;
        let objs_end = m.data.len() as u64;
        let n = 1000u64;
        m.data.resize((objs_end + (n + 1) * 0x60) as usize, 0);
        m.data_relocs[1].addend = objs_end as i64;
        for i in 0..n {
            m.data_relocs.push(Reloc::abs64(
                objs_end + i * 0x60 + 8,
                Sym::Section(Sec::Data),
                funcs_at,
            ));
        }
        let i = quick(&m.build().bytes).unwrap();
        assert!(i.functions().count() <= MAX_FUNCTIONS);
        assert!(i.functions().count() >= MAX_ARRAY_ENTRIES);
    }

    /// Every single-byte corruption of a generated module, in the places
    /// the walk reads: an error or a result, never a panic, never slow.
    #[test]
    fn corrupted_generated_module_never_panics() {
        let b = two_objects().build();
        for at in (b.rela_data..b.rela_data + 24 * 8).chain(b.data_shdr..b.data_shdr + 64) {
            for v in [0x00, 0x7f, 0x80, 0xff] {
                let mut x = b.bytes.clone();
                x[at] = v;
                let _ = quick(&x);
            }
        }
        let _ = b.rodata;
    }

    #[test]
    fn module_names_are_filtered() {
        for good in ["hp_cmdline", "nf-tables", "a", &"x".repeat(55)] {
            assert!(is_module_name(good), "{good}");
        }
        for bad in [
            "",
            "../../../a",
            "a/b",
            ".",
            "..",
            "a b",
            "a\nb",
            "é",
            &"x".repeat(56),
        ] {
            assert!(!is_module_name(bad), "{bad}");
        }
    }

    /// /tmp/hp_trav.ko: struct module's name unusable, modinfo
    /// `name=../../../a`. Neither is taken: the module has no name.
    #[test]
    fn traversal_name_is_not_taken() {
        let mut m = ModuleSpec::simple("hp/cmdline");
        m.modinfo.retain(|(k, _)| k != "name");
        m.modinfo.push(("name".into(), "../../../a".into()));
        let i = quick(&m.build().bytes).unwrap();
        assert_eq!(i.name, None);
        assert!(
            i.warnings
                .iter()
                .any(|w| w.contains("not a valid module name")),
            "{:?}",
            i.warnings
        );
        // A valid modinfo name is still the fallback.
        let mut m = ModuleSpec::simple("hp/cmdline");
        m.modinfo.retain(|(k, _)| k != "name");
        m.modinfo.push(("name".into(), "hp_ok".into()));
        assert_eq!(
            quick(&m.build().bytes).unwrap().name.as_deref(),
            Some("hp_ok")
        );
    }

    #[test]
    fn c_strings_are_bounded_and_printable() {
        assert_eq!(c_string(b"abc\0def").as_deref(), Some("abc"));
        assert_eq!(c_string(b"no terminator"), None);
        assert_eq!(c_string(b"bell\x07\0"), None);
        assert_eq!(c_string(&[b'a'; 600]), None);
    }
}

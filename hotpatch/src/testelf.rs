//! A generator of small synthetic livepatch modules (ELF64 x86_64 `ET_REL`)
//! for tests: the same sections, symbols and relocations a kbuild livepatch
//! has (`.text`, `.rodata.str1.1`, `.data` holding `klp_patch` →
//! `klp_object[]` → `klp_func[]`, `.rela.data`, `.modinfo`,
//! `.gnu.linkonce.this_module`), laid out so tests can corrupt exactly one
//! field and see what the inspector does. Not a linker: only what the
//! inspector reads is modelled.

/// `R_X86_64_64`: a 64-bit absolute pointer.
pub const R_X86_64_64: u32 = 1;
/// `R_X86_64_PC32`: what code uses to reach data (addend usually negative).
pub const R_X86_64_PC32: u32 = 2;
/// `R_X86_64_32S`: `mov $sym, %reg` in code.
pub const R_X86_64_32S: u32 = 11;

/// Sections a relocation can point at through their section symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sec {
    Text,
    Rodata,
    Data,
}

/// The symbol a relocation refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sym {
    /// The section symbol of a section (value 0: the addend is the offset).
    Section(Sec),
    /// `__this_module` (global, in `.gnu.linkonce.this_module`).
    ThisModule,
    /// The n-th replacement function (`<old>_new`, in `.text`).
    Func(usize),
    /// An undefined symbol (`printk`-like): index past the defined ones.
    Undefined,
}

#[derive(Debug, Clone, Copy)]
pub struct Reloc {
    pub offset: u64,
    pub sym: Sym,
    pub kind: u32,
    pub addend: i64,
}

impl Reloc {
    pub fn abs64(offset: u64, sym: Sym, addend: i64) -> Self {
        Reloc {
            offset,
            sym,
            kind: R_X86_64_64,
            addend,
        }
    }
}

/// One patched object: its name (None = vmlinux, a NULL `name`) and the
/// functions `(old_name, old_sympos)` it replaces.
#[derive(Debug, Clone)]
pub struct Object {
    pub name: Option<String>,
    pub funcs: Vec<(String, u64)>,
}

#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// `struct module.name` in `.gnu.linkonce.this_module`.
    pub this_module_name: String,
    pub modinfo: Vec<(String, String)>,
    pub text: Vec<u8>,
    pub rodata: Vec<u8>,
    pub data: Vec<u8>,
    pub data_relocs: Vec<Reloc>,
    pub text_relocs: Vec<Reloc>,
    /// Names of the `Sym::Func` symbols, each 16 bytes into `.text`.
    pub func_names: Vec<String>,
}

/// Where things landed in the built file, for targeted corruption.
#[derive(Debug, Clone)]
pub struct Built {
    pub bytes: Vec<u8>,
    /// File offset of the `.data` section header.
    pub data_shdr: usize,
    /// File offset of `.rela.data`'s first entry.
    pub rela_data: usize,
    /// File offset of `.rodata.str1.1`'s bytes.
    pub rodata: usize,
}

impl Built {
    /// Set `.data`'s `sh_size` (a header claim the file need not back).
    pub fn set_data_size(&mut self, size: u64) {
        let at = self.data_shdr + 32;
        self.bytes[at..at + 8].copy_from_slice(&size.to_le_bytes());
    }
    /// Overwrite the `r_offset` of the n-th `.rela.data` entry.
    pub fn set_data_reloc_offset(&mut self, n: usize, offset: u64) {
        let at = self.rela_data + n * 24;
        self.bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
    }
    /// Overwrite the addend of the n-th `.rela.data` entry.
    pub fn set_data_reloc_addend(&mut self, n: usize, addend: i64) {
        let at = self.rela_data + n * 24 + 16;
        self.bytes[at..at + 8].copy_from_slice(&addend.to_le_bytes());
    }
}

const PATCH_SIZE: u64 = 0x40;
const OBJ_STRIDE: u64 = 0x60;
const FUNC_STRIDE: u64 = 0x40;
const THIS_MODULE_SIZE: usize = 0x380;
const VERMAGIC: &str = "6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions ";

impl ModuleSpec {
    /// A livepatch named `name` for the Debian 6.1 guest kernel, patching
    /// `objects`, with `klp_patch.replace = replace`.
    pub fn livepatch(name: &str, objects: &[Object], replace: bool) -> Self {
        Self::livepatch_for(name, VERMAGIC, objects, replace)
    }

    pub fn livepatch_for(name: &str, vermagic: &str, objects: &[Object], replace: bool) -> Self {
        let mut rodata = Vec::new();
        let mut string = |s: &str| {
            let at = rodata.len() as i64;
            rodata.extend_from_slice(s.as_bytes());
            rodata.push(0);
            at
        };
        let nobj = objects.len() as u64;
        // klp_patch at 0, objects after it, each object's funcs after the
        // objects' terminator.
        let objs_at = PATCH_SIZE;
        let mut funcs_at = objs_at + (nobj + 1) * OBJ_STRIDE;
        let mut data_relocs = vec![
            Reloc::abs64(0, Sym::ThisModule, 0),
            Reloc::abs64(8, Sym::Section(Sec::Data), objs_at as i64),
        ];
        let mut func_names = Vec::new();
        let mut sympos_at = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let obj = objs_at + i as u64 * OBJ_STRIDE;
            if let Some(n) = &o.name {
                let s = string(n);
                data_relocs.push(Reloc::abs64(obj, Sym::Section(Sec::Rodata), s));
            }
            data_relocs.push(Reloc::abs64(
                obj + 8,
                Sym::Section(Sec::Data),
                funcs_at as i64,
            ));
            for (j, (old, pos)) in o.funcs.iter().enumerate() {
                let f = funcs_at + j as u64 * FUNC_STRIDE;
                let s = string(old);
                data_relocs.push(Reloc::abs64(f, Sym::Section(Sec::Rodata), s));
                data_relocs.push(Reloc::abs64(f + 8, Sym::Func(func_names.len()), 0));
                func_names.push(format!("{name}_{old}"));
                sympos_at.push((f + 16, *pos));
            }
            funcs_at += (o.funcs.len() as u64 + 1) * FUNC_STRIDE;
        }
        let mut data = vec![0u8; funcs_at as usize];
        data[24] = u8::from(replace);
        for (at, pos) in sympos_at {
            data[at as usize..at as usize + 8].copy_from_slice(&pos.to_le_bytes());
        }
        // klp_enable_patch(&patch) in init: `mov $.data, %rdi` then a call.
        let mut text = vec![0xccu8; 16 * func_names.len().max(1) + 16];
        let init = text.len() as u64 - 16;
        text[init as usize] = 0x48;
        let text_relocs = vec![
            Reloc {
                offset: init + 3,
                sym: Sym::Section(Sec::Data),
                kind: R_X86_64_32S,
                addend: 0,
            },
            Reloc {
                offset: init + 8,
                sym: Sym::Undefined,
                kind: R_X86_64_PC32,
                addend: -4,
            },
        ];
        ModuleSpec {
            this_module_name: name.to_string(),
            modinfo: vec![
                ("vermagic".into(), vermagic.into()),
                ("livepatch".into(), "Y".into()),
                ("license".into(), "GPL".into()),
                ("name".into(), name.into()),
            ],
            text,
            rodata,
            data,
            data_relocs,
            text_relocs,
            func_names,
        }
    }

    /// A single-function vmlinux livepatch.
    pub fn simple(name: &str) -> Self {
        Self::livepatch(
            name,
            &[Object {
                name: None,
                funcs: vec![("cmdline_proc_show".into(), 0)],
            }],
            false,
        )
    }

    pub fn build(&self) -> Built {
        let syms = Symbols::new(&self.func_names);
        let shs = self.sections(syms);
        debug_assert_eq!(shs.len() + 1, NSEC);
        let (mut out, offsets, shoff) = lay_out(&shs);
        write_elf_header(&mut out, shoff);
        Built {
            data_shdr: shoff + 64 * usize::from(DATA),
            rela_data: offsets[RELA_DATA as usize - 1],
            rodata: offsets[usize::from(RODATA) - 1],
            bytes: out,
        }
    }

    /// Every section but the null one, in index order.
    fn sections(&self, syms: Symbols) -> Vec<Sh> {
        let mut shstrtab = StrTab::new();
        let mut sh = |name: &str, kind: u32, flags: u64, data: Vec<u8>| Sh {
            name: shstrtab.add(name),
            kind,
            flags,
            data,
            link: 0,
            info: 0,
            entsize: 0,
        };
        let rela = |sh: Sh, target: u16| Sh {
            link: SYMTAB,
            info: u32::from(target),
            entsize: 24,
            ..sh
        };
        let mut shs = vec![
            sh(".text", SHT_PROGBITS, A | X, self.text.clone()),
            rela(
                sh(
                    ".rela.text",
                    SHT_RELA,
                    INFO_LINK,
                    syms.rela(&self.text_relocs),
                ),
                TEXT,
            ),
            Sh {
                entsize: 1,
                ..sh(".rodata.str1.1", SHT_PROGBITS, A | MS, self.rodata.clone())
            },
            sh(".data", SHT_PROGBITS, W | A, self.data.clone()),
            rela(
                sh(
                    ".rela.data",
                    SHT_RELA,
                    INFO_LINK,
                    syms.rela(&self.data_relocs),
                ),
                DATA,
            ),
            sh(".modinfo", SHT_PROGBITS, A, self.modinfo_bytes()),
            sh(
                ".gnu.linkonce.this_module",
                SHT_PROGBITS,
                W | A,
                self.this_module_bytes(),
            ),
            Sh {
                link: STRTAB,
                info: syms.first_global as u32,
                entsize: 24,
                ..sh(".symtab", SHT_SYMTAB, 0, syms.table.concat())
            },
            sh(".strtab", SHT_STRTAB, 0, syms.names.bytes),
        ];
        let name = shstrtab.add(".shstrtab");
        shs.push(Sh {
            name,
            kind: SHT_STRTAB,
            flags: 0,
            data: shstrtab.bytes,
            link: 0,
            info: 0,
            entsize: 0,
        });
        shs
    }

    /// `.modinfo`: `key=value` strings, NUL-terminated.
    fn modinfo_bytes(&self) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for (k, v) in &self.modinfo {
            modinfo.extend_from_slice(format!("{k}={v}").as_bytes());
            modinfo.push(0);
        }
        modinfo
    }

    /// `struct module` with only its `name` (at offset 24, 56 bytes) set.
    fn this_module_bytes(&self) -> Vec<u8> {
        let mut this_module = vec![0u8; THIS_MODULE_SIZE];
        let nb = self.this_module_name.as_bytes();
        let nb = &nb[..nb.len().min(55)];
        this_module[24..24 + nb.len()].copy_from_slice(nb);
        this_module
    }
}

// Section indices.
const TEXT: u16 = 1;
const RODATA: u16 = 3;
const DATA: u16 = 4;
const RELA_DATA: u32 = 5;
const THIS_MODULE: u16 = 7;
const SYMTAB: u32 = 8;
const STRTAB: u32 = 9;
const SHSTRTAB: u32 = 10;
const NSEC: usize = 11;

// Section types and flags.
const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_RELA: u32 = 4;
const W: u64 = 1;
const A: u64 = 2;
const X: u64 = 4;
const MS: u64 = 0x10 | 0x20;
const INFO_LINK: u64 = 0x40;

// Symbol types and binding.
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const STT_SECTION: u8 = 3;
const GLOBAL: u8 = 1 << 4;

/// One section header's fields and the section's bytes.
struct Sh {
    name: u32,
    kind: u32,
    flags: u64,
    data: Vec<u8>,
    link: u32,
    info: u32,
    entsize: u64,
}

/// A string table: NUL-separated names, starting with an empty one.
struct StrTab {
    bytes: Vec<u8>,
}

impl StrTab {
    fn new() -> StrTab {
        StrTab { bytes: vec![0] }
    }
    /// Append `s`; its offset, which is how ELF names it.
    fn add(&mut self, s: &str) -> u32 {
        let at = self.bytes.len() as u32;
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
        at
    }
}

/// The symbol table: null, 3 section symbols, the functions (local), then
/// `__this_module` and one undefined symbol (global).
struct Symbols {
    table: Vec<[u8; 24]>,
    names: StrTab,
    first_func: usize,
    first_global: usize,
}

fn sym(name: u32, info: u8, shndx: u16, value: u64, size: u64) -> [u8; 24] {
    let mut e = [0u8; 24];
    e[..4].copy_from_slice(&name.to_le_bytes());
    e[4] = info;
    e[6..8].copy_from_slice(&shndx.to_le_bytes());
    e[8..16].copy_from_slice(&value.to_le_bytes());
    e[16..24].copy_from_slice(&size.to_le_bytes());
    e
}

impl Symbols {
    fn new(func_names: &[String]) -> Symbols {
        let mut names = StrTab::new();
        let mut table: Vec<[u8; 24]> = vec![[0; 24]];
        for shndx in [TEXT, RODATA, DATA] {
            table.push(sym(0, STT_SECTION, shndx, 0, 0));
        }
        let first_func = table.len();
        for (i, f) in func_names.iter().enumerate() {
            table.push(sym(names.add(f), STT_FUNC, TEXT, 16 * i as u64, 16));
        }
        let first_global = table.len();
        let n = names.add("__this_module");
        table.push(sym(
            n,
            GLOBAL | STT_OBJECT,
            THIS_MODULE,
            0,
            THIS_MODULE_SIZE as u64,
        ));
        let n = names.add("klp_enable_patch");
        table.push(sym(n, GLOBAL, 0, 0, 0));
        Symbols {
            table,
            names,
            first_func,
            first_global,
        }
    }

    fn index(&self, s: Sym) -> u64 {
        match s {
            Sym::Section(Sec::Text) => 1,
            Sym::Section(Sec::Rodata) => 2,
            Sym::Section(Sec::Data) => 3,
            Sym::Func(i) => (self.first_func + i) as u64,
            Sym::ThisModule => self.first_global as u64,
            Sym::Undefined => self.first_global as u64 + 1,
        }
    }

    /// `Elf64_Rela` entries for `relocs`.
    fn rela(&self, relocs: &[Reloc]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in relocs {
            out.extend_from_slice(&r.offset.to_le_bytes());
            out.extend_from_slice(&((self.index(r.sym) << 32) | u64::from(r.kind)).to_le_bytes());
            out.extend_from_slice(&r.addend.to_le_bytes());
        }
        out
    }
}

fn pad8(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
}

/// Room for the ELF header, each section's bytes 8-aligned, then the
/// section headers (null first). Returns the file, each section's offset
/// and the section header table's offset.
fn lay_out(shs: &[Sh]) -> (Vec<u8>, Vec<usize>, usize) {
    let mut out = vec![0u8; 64];
    let mut offsets = Vec::new();
    for s in shs {
        pad8(&mut out);
        offsets.push(out.len());
        out.extend_from_slice(&s.data);
    }
    pad8(&mut out);
    let shoff = out.len();
    out.extend_from_slice(&[0u8; 64]);
    for (s, off) in shs.iter().zip(&offsets) {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(&s.name.to_le_bytes());
        h[4..8].copy_from_slice(&s.kind.to_le_bytes());
        h[8..16].copy_from_slice(&s.flags.to_le_bytes());
        h[24..32].copy_from_slice(&(*off as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
        h[40..44].copy_from_slice(&s.link.to_le_bytes());
        h[44..48].copy_from_slice(&s.info.to_le_bytes());
        h[48..56].copy_from_slice(&8u64.to_le_bytes());
        h[56..64].copy_from_slice(&s.entsize.to_le_bytes());
        out.extend_from_slice(&h);
    }
    (out, offsets, shoff)
}

/// The ELF64 header of an x86_64 relocatable object.
fn write_elf_header(out: &mut [u8], shoff: usize) {
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // 64-bit
    out[5] = 1; // little endian
    out[6] = 1;
    out[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[58..60].copy_from_slice(&64u16.to_le_bytes());
    out[60..62].copy_from_slice(&(NSEC as u16).to_le_bytes());
    out[62..64].copy_from_slice(&(SHSTRTAB as u16).to_le_bytes());
}

//! The programs' stack as the oldest supported kernel counts it, read from the eBPF object
//! itself (no kernel needed). Linux before 6.x rounds each BPF function's frame up to 32 bytes
//! (at least 32, even for a function that uses none, such as `memset`) and refuses a program
//! whose deepest call chain adds up to more than 512. Linux 6.18 rounds to 16 and counts an
//! empty frame as 0, so a program can pass its verifier and be refused on 5.10: this test is
//! how that shows up on a machine without a 5.10 kernel.
use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};
use sluice::dataplane::EBPF_OBJECT;

/// The stack limit of a BPF program, across its call chain.
const MAX_STACK: u32 = 512;

struct Function {
    /// The deepest byte below the frame pointer (r10) the function touches.
    depth: u32,
    /// The BPF functions it calls.
    calls: Vec<String>,
    /// The length of each `memset` it calls, where a constant set just before (`r3 = n`).
    memsets: Vec<Option<i32>>,
}

/// Every function of the object, with its stack depth and callees, and the sections they
/// are in.
fn functions() -> (HashMap<String, Function>, HashMap<String, String>) {
    let obj = object::File::parse(EBPF_OBJECT).expect("the embedded eBPF object parses");
    // Functions by where they start: (section, offset in it).
    let mut at: HashMap<(usize, u64), String> = HashMap::new();
    for sym in obj.symbols() {
        if let (SymbolKind::Text, Ok(name), Some(index)) =
            (sym.kind(), sym.name(), sym.section_index())
            && sym.size() > 0
        {
            let section = obj.section_by_index(index).unwrap();
            at.insert(
                (index.0, sym.address() - section.address()),
                name.to_owned(),
            );
        }
    }
    let mut out = HashMap::new();
    let mut section_of = HashMap::new();
    for sym in obj.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let (Ok(name), Some(index)) = (sym.name(), sym.section_index()) else {
            continue;
        };
        let section = obj.section_by_index(index).unwrap();
        let data = section.data().unwrap();
        let start = sym.address() - section.address();
        let code = &data[start as usize..(start + sym.size()) as usize];
        // A call to another BPF function is either relative to the next instruction, in the
        // same section, or a relocation against the callee's symbol or (with the offset in
        // the instruction) against its section's.
        let relocations: HashMap<u64, (usize, u64, bool)> = section
            .relocations()
            .filter_map(|(offset, r)| match r.target() {
                RelocationTarget::Symbol(i) => obj.symbol_by_index(i).ok().and_then(|s| {
                    let sec = s.section_index()?;
                    let base = obj.section_by_index(sec).ok()?.address();
                    Some((
                        offset,
                        (sec.0, s.address() - base, s.kind() == SymbolKind::Section),
                    ))
                }),
                _ => None,
            })
            .collect();
        let mut depth = 0u32;
        let mut calls = Vec::new();
        let mut memsets = Vec::new();
        // r3's constant, while it has one: a `memset`'s length.
        let mut r3: Option<i32> = None;
        let mut from_fp: [bool; 11] = [false; 11];
        for (i, insn) in code.as_chunks::<8>().0.iter().enumerate() {
            let (opcode, dst, src) = (insn[0], insn[1] & 0x0f, insn[1] >> 4);
            let off = i16::from_le_bytes([insn[2], insn[3]]);
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            let base = match opcode & 0x07 {
                0x01 => Some(src),        // LDX: from [src + off]
                0x02 | 0x03 => Some(dst), // ST, STX: to [dst + off]
                _ => None,
            };
            if base == Some(10) && off < 0 {
                depth = depth.max(u32::from(off.unsigned_abs()));
            }
            let here = start + (i as u64) * 8;
            // A stack address taken (`rX = r10; rX += -n`), to pass to a helper.
            match opcode {
                0xbf if usize::from(dst) < 11 => from_fp[usize::from(dst)] = src == 10,
                0x07 if usize::from(dst) < 11 && from_fp[usize::from(dst)] && imm < 0 => {
                    depth = depth.max(imm.unsigned_abs());
                }
                0x85 if src == 1 => {
                    let relative = |from: u64| (from as i64 + (i64::from(imm) + 1) * 8) as u64;
                    let target = match relocations.get(&here) {
                        Some(&(sec, addr, false)) => (sec, addr),
                        Some(&(sec, addr, true)) => (sec, relative(addr)),
                        None => (index.0, relative(here)),
                    };
                    let callee = at.get(&target).cloned().unwrap_or_default();
                    if callee == "memset" {
                        memsets.push(r3);
                    }
                    calls.push(callee);
                }
                _ => {}
            }
            // ALU and load instructions write `dst`; a call clobbers r1 to r5.
            let class = opcode & 0x07;
            if (opcode == 0xb7 || opcode == 0xb4) && dst == 3 {
                r3 = Some(imm);
            } else if opcode == 0x85 || (matches!(class, 0x00 | 0x01 | 0x04 | 0x07) && dst == 3) {
                r3 = None;
            }
        }
        section_of.insert(
            name.to_owned(),
            section.name().unwrap_or_default().to_owned(),
        );
        out.insert(
            name.to_owned(),
            Function {
                depth,
                calls,
                memsets,
            },
        );
    }
    (out, section_of)
}

/// The stack of `name` and its deepest chain of callees, each frame as Linux 5.10 counts it.
fn chain_depth(fns: &HashMap<String, Function>, name: &str, seen: &mut Vec<String>) -> u32 {
    let Some(f) = fns.get(name) else {
        panic!("a call to {name:?}, which is no function of the object");
    };
    let own = f.depth.max(1).div_ceil(32) * 32;
    if seen.iter().any(|s| s == name) {
        return own;
    }
    seen.push(name.to_owned());
    let deepest = f
        .calls
        .iter()
        .map(|c| chain_depth(fns, c, seen))
        .max()
        .unwrap_or(0);
    seen.pop();
    own + deepest
}

#[test]
fn every_program_fits_the_stack_as_linux_5_10_counts_it() {
    let (fns, section_of) = functions();
    let programs: Vec<&String> = fns.keys().filter(|n| section_of[*n] != ".text").collect();
    assert!(
        programs.iter().any(|p| p.as_str() == "sluice_from_uplink"),
        "the TC programs are in the object: {programs:?}"
    );
    let mut report = Vec::new();
    for p in &programs {
        let total = chain_depth(&fns, p, &mut Vec::new());
        report.push(format!("{p}: {total} (own frame {})", fns[*p].depth));
        assert!(
            total <= MAX_STACK,
            "{p} needs {total} bytes of stack on Linux 5.10 (frame {} bytes, calls {:?}); \
             the limit is {MAX_STACK}",
            fns[*p].depth,
            fns[*p].calls
        );
    }
    println!("{}", report.join("\n"));
}

/// The compiler's `memset` is, in BPF, a byte loop in a function of its own: five
/// instructions a byte, and a call. It must not run per packet for what a few stores do: the
/// three padding bytes of a map key (`Lb4Key`, on every frontend lookup) or a FIB query's 64
/// bytes (every redirected packet, at TC and XDP). What remains zeroes packet bytes when a
/// reject is built (16 and 20 bytes), off the hot path.
#[test]
fn no_program_calls_memset_for_a_map_key_or_a_fib_query() {
    let (fns, _) = functions();
    let mut bad = Vec::new();
    for (name, f) in &fns {
        for len in &f.memsets {
            if matches!(len, Some(3) | Some(64) | None) {
                bad.push(format!("{name}: memset of {len:?} bytes"));
            }
        }
    }
    bad.sort();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(
        fns["sluice_xdp_from_uplink"].memsets.is_empty(),
        "XDP's program calls memset: {:?}",
        fns["sluice_xdp_from_uplink"].memsets
    );
}

fn main() {
    // A non-PIE `shoal` starts faster (no 34,000 relocations to apply):
    // every container start re-executes it as its supervisor and init, so
    // this is ~0.3 ms off each `shoal run` (BENCHMARKS.md, issue 3).
    println!("cargo:rustc-link-arg-bin=shoal=-no-pie");
}

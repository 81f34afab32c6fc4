fn main() {
    let obj = include_bytes!(concat!(env!("OUT_DIR"), "/lb-xdp"));
    println!("{}", obj.len());
}

pub mod bench_data;
pub mod data;
pub mod run;

pub mod bench_data;
pub mod bench_train;
pub mod data;
pub mod eval;
pub mod generate;
pub mod model_args;
pub mod run;
pub mod train;

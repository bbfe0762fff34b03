fn main() -> tlens::Result<()> {
    let run = tlens::RunFile::open("fixtures/demo_p113.pth")?;
    let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
    let t = std::time::Instant::now();
    let ev = tlens::eval::evaluate(&model, run.train_indices.as_ref().unwrap(), run.test_indices.as_ref().unwrap())?;
    println!("{:?} in {:?}", ev, t.elapsed());
    println!("recorded test loss {}", run.test_losses.last().unwrap());
    let (tokens, _) = tlens::task::modular_addition(113);
    let t = std::time::Instant::now();
    let g = tlens::eval::last_logits_general(&model, &tokens)?;
    let tg = t.elapsed();
    let f = tlens::eval::last_logits_fast(&model, &tokens)?;
    let diff = (&g - &f).mapv(f32::abs).fold(0f32, |a, &b| a.max(b));
    println!("general {:?}, max |general - fast| = {diff}", tg);
    let (tr, te) = tlens::task::demo_split(113, 0.3, 598);
    println!("split matches file: {}", &tr == run.train_indices.as_ref().unwrap() && &te == run.test_indices.as_ref().unwrap());
    println!("{:?}", model.hook_names());
    Ok(())
}

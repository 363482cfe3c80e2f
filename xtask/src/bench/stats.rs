//! Samples collected per configuration, and their medians.
use super::configs::Config;

/// The runs of one configuration in one test: what was measured and what failed.
pub struct Series<S> {
    pub samples: Vec<S>,
    pub failures: Vec<String>,
}

impl<S> Default for Series<S> {
    fn default() -> Self {
        Series {
            samples: Vec::new(),
            failures: Vec::new(),
        }
    }
}

impl<S: Copy> Series<S> {
    /// The median of one measured quantity, `None` when it was never measured.
    pub fn median(&self, value: impl Fn(&S) -> Option<f64>) -> Option<f64> {
        median(self.samples.iter().filter_map(value).collect())
    }

    /// Each run's value of one quantity, in run order.
    pub fn values(&self, value: impl Fn(&S) -> Option<f64>) -> Vec<f64> {
        self.samples.iter().filter_map(value).collect()
    }
}

/// The median (mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// One series per configuration, in [`Config::ALL`] order.
pub struct ByConfig<S> {
    pub series: Vec<Series<S>>,
}

impl<S: Copy> ByConfig<S> {
    pub fn new() -> Self {
        ByConfig {
            series: Config::ALL.iter().map(|_| Series::default()).collect(),
        }
    }

    pub fn get(&self, config: Config) -> &Series<S> {
        &self.series[index(config)]
    }

    pub fn get_mut(&mut self, config: Config) -> &mut Series<S> {
        &mut self.series[index(config)]
    }

    /// The HAProxy configuration with the higher median of `value` (the "better" HAProxy the
    /// ratios compare with), if either was measured.
    pub fn best_haproxy(&self, value: impl Fn(&S) -> Option<f64> + Copy) -> Option<(Config, f64)> {
        Config::ALL
            .into_iter()
            .filter(|c| c.is_haproxy())
            .filter_map(|c| Some((c, self.get(c).median(value)?)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The lowest median of `value` over the HAProxy configurations (for costs: lower is better).
    pub fn lowest_haproxy(&self, value: impl Fn(&S) -> Option<f64> + Copy) -> Option<f64> {
        Config::ALL
            .into_iter()
            .filter(|c| c.is_haproxy())
            .filter_map(|c| self.get(c).median(value))
            .min_by(f64::total_cmp)
    }
}

fn index(config: Config) -> usize {
    Config::ALL.iter().position(|c| *c == config).unwrap_or(0)
}

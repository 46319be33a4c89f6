"""The next-action class lists of the official MedVidBench evaluator.

Next-action accuracy is classification against a per-dataset list of labels (for NurViD,
per procedure); datasets without a list use the distinct ground-truth labels instead.
These are the official evaluator's lists, kept verbatim (including their truncated
labels, e.g. ``"Spread the proximal bedshee"``): a ground truth is only counted when it
is in its list, so any edit here changes the metric.
"""

from __future__ import annotations

AVOS_ACTIONS = ("cutting", "tying", "suturing")

CHOLECT50_PHASES = (
    "preparation",
    "carlot-triangle-dissection",
    "clipping-and-cutting",
    "gallbladder-dissection",
    "gallbladder-packaging",
    "cleaning-and-coagulation",
    "gallbladder-extraction",
)

COPESD_ACTIONS = (
    "adjust camera",
    "position flap with forceps and knife",
    "dissect flap tissue with knife",
    "position flap with forceps only",
    "retract flap edge with forceps only",
    "retract flap edge with forceps and knife",
    "lift flap with forceps",
    "stabilize flap with forceps",
)

# Older CoPESD label -> current label, applied to predictions and ground truths alike.
COPESD_RENAMES = {
    "manipulate flap with forceps and knife": "position flap with forceps and knife",
    "dissect flap with knife": "dissect flap tissue with knife",
    "manipulate flap with forceps": "position flap with forceps only",
    "retract flap with forceps": "retract flap edge with forceps only",
    "retract flap with forceps and knife": "retract flap edge with forceps and knife",
    "lift flap with forceps": "lift flap with forceps",
    "hold flap with forceps": "stabilize flap with forceps",
    "retracting mucosa flap with forceps and knife": "retract flap edge with forceps and knife",
}

# NurViD procedure -> its actions. Order matters: the procedure of a question is the FIRST
# one whose name occurs in it (so "Subcutaneous Injection Insulin" questions resolve to
# "Subcutaneous Injection", an official quirk kept on purpose).
NURVID_PROCEDURE_ACTIONS: dict[str, tuple[str, ...]] = {
    "Administering Oral Medications": (
        "Assist patient taking medicine",
        "Check",
        "Document",
        "Handwashing",
        "Organize the bed unit",
        "Position the patient",
        "Prepare medications",
    ),
    "Aseptic Technique": ("Check", "Take treatment towels"),
    "Bed Rubbing": (
        "Change upper clothing",
        "Cleanse back",
        "Cleanse chest and abdomen",
        "Cleanse perineum",
        "Handwashing",
        "Rub lower limbs",
        "Rub upper limbs",
        "Soak feet",
        "Wash face",
    ),
    "Bed Shampoo": (
        "Apply shampoo",
        "Comb hair",
        "Dry hair",
        "Moisten hair",
        "Place an underpad",
        "Rinse shampoo",
    ),
    "Blood Glucose Monitoring": (
        "Disinfect skin",
        "Document",
        "Handwashing",
        "Measure blood glucose level",
        "Prepare glucometer",
    ),
    "Cardiopulmonary Resuscitation WIth Manual Resuscitation Bag": (
        "Administer oxygen",
        "Assist with ventilation using a simple respirator",
        "Defibrillate",
        "Identify cardiac arrest",
        "Open airway",
        "Perform chest compressions",
    ),
    "Change Sheets of an Occupied Bed": (
        "Change pillowcase",
        "Handwashing",
        "Prepare operating space",
        "Remove proximal bedsheet",
        "Replace clean bedsheet",
        "Spread the opposite side bed sheet",
        "Spread the proximal bedshee",
        "Withdraw contaminated bed shee",
        "Withdraw the opposite side bed sheet",
    ),
    "Change Wound Dressings": ("Cleanse skin", "Document", "Fill in dressing", "Handwashing"),
    "Change a One-Piece Pouching System": (
        "Apply leak prevention ointment",
        "Apply skin protection film",
        "Cleanse skin",
        "Handwashing",
        "Remove ostomy bag",
        "Secure ostomy bag",
        "Trim ostomy bag baseplate",
    ),
    "Change a Two-Piece Pouching System": (
        "Apply leak prevention ointment",
        "Apply skin protection film",
        "Cleanse skin",
        "Handwashing",
        "Remove ostomy bag",
        "Remove the base plate",
        "Secure ostomy bag",
        "Secure the base",
        "Spray stoma care powder",
        "Trim ostomy bag baseplate",
    ),
    "Closed Bed Making": ("Cover pillow with pillowcase", "Prepare operating space", "Spread the large sheet"),
    "Closed Intravenous infusion": (
        "Adjust drip rate",
        "Check",
        "Connect infusion device",
        "Disinfect skin",
        "Document",
        "Handwashing",
        "Release trapped air",
        "Remove needle",
        "Select a vein",
        "Venipuncture",
    ),
    "Closed System Blood Transfusion": ("Check", "Handwashing", "Release trapped air", "Transfuse blood"),
    "Defibrillation": ("Defibrillate", "Observe defibrillation results", "Prepare defibrillation device"),
    "Donning and Doffing Isolation Gowns": (
        "Fasten buckle",
        "Handwashing",
        "Loosen isolation gown",
        "Put on isolation gown",
        "Remove isolation gown",
        "Tie waist knot",
    ),
    "Electrocardiogram": (
        "Connect lead wires",
        "Expose the connection sit",
        "Remove the lead wires",
        "Save electrocardiogram (ECG) results",
    ),
    "Female Retention Catheterization": (
        "Disinfect skin",
        "Establish a sterile zone",
        "Insert urinary catheter",
        "Remove urinary catheter",
    ),
    "High-Volume Colonic Enemas": (
        "Check",
        "Inject medication",
        "Insert rectal tube",
        "Place an underpad",
        "Position the patient",
        "Remove rectal tube",
    ),
    "Infusion by Pump": ("Connect infusion device", "Flush the sealed tube", "Release trapped air", "Set parameters"),
    "Intramuscular Injection": (
        "Check",
        "Disinfect skin",
        "Handwashing",
        "Inject medication",
        "Position the patient",
        "Prepare medication solution",
    ),
    "Intravenous Blood Sampling": (
        "Blood collection",
        "Check",
        "Disinfect skin",
        "Document",
        "Handwashing",
        "Mix blood sample",
        "Select a vein",
        "Venipuncture",
    ),
    "Intravenous Injection": (
        "Check",
        "Disinfect skin",
        "Document",
        "Handwashing",
        "Inject medication",
        "Prepare medication solution",
        "Release trapped air",
        "Select a vein",
        "Venipuncture",
    ),
    "Logrolling with Draw Sheet": (
        "Check",
        "Check and secure the tubing",
        "Handwashing",
        "Shift to the right side",
        "Turn patient to left lateral position",
    ),
    "Male Retention Catheterization": (
        "Disinfect skin",
        "Establish a sterile zone",
        "Insert urinary catheter",
        "Position the patient",
        "Remove urinary catheter",
    ),
    "Modified Seldinger Technique with Ultrasound for PICC Placement": (
        "Check and secure the tubing",
        "Disinfect skin",
        "Establish a sterile zone",
        "PICC insertion",
        "Withdraw the introducer sheath",
    ),
    "Multi-Parameter Monitoring": ("Connect the monitor", "Monitor blood oxygen saturation"),
    "Nasogastric Gavage": (
        "Confirm the position of the gastric tube in the stomach",
        "Handwashing",
        "Insert gastric tube",
        "Measure the length of the gastric tube",
        "Nasogastric feeding",
        "Place an underpad",
        "Position the patient",
        "Remove gastric tube",
        "Secure gastric tube",
    ),
    "Nasogastric Tube": (
        "Check the pressure reducer",
        "Document",
        "Insert gastric tube",
        "Measure the length of the gastric tube",
        "Observe drainage situation",
        "Position the patient",
    ),
    "Oral Care for Unconscious Patients": (
        "Check",
        "Cleanse inner surfaces of teeth",
        "Cleanse lips",
        "Cleanse outer surfaces of teeth",
        "Document",
        "Handwashing",
        "Place an underpad",
        "Position the patient",
        "Prepare cotton balls",
    ),
    "Oral and Nasal Suctioning with Central Negative Pressure Device": (
        "Connect suction catheter",
        "Organize the bed unit",
        "Perform endotracheal suctioning",
        "Perform nasopharyngeal and nasotracheal suction",
        "Perform oral-pharyngeal suction",
    ),
    "Oral and Nasal Suctioning with Electric Suction Device": (
        "Adjust negative pressure",
        "Check",
        "Connect suction catheter",
        "Handwashing",
        "Perform nasopharyngeal and nasotracheal suction",
        "Perform oral-pharyngeal suction",
        "Rinse suction catheter",
    ),
    "Oxygen Nebulization": ("Adjust oxygen flow rate", "Guide nebulization", "Install nebulizer", "Withdraw nebulizer"),
    "Oxygen Therapy with Central Oxygen Supply": (
        "Adjust oxygen flow rate",
        "Administer oxygen",
        "Handwashing",
        "Install oxygen inhalation device",
        "Withdraw oxygen inhalation device",
    ),
    "Penicillin Skin Testing": (
        "Check",
        "Disinfect skin",
        "Handwashing",
        "Observe results of skin test",
        "Perform intradermal puncture",
        "Prepare skin test solution",
        "Release trapped air",
    ),
    "Perineal Care": (
        "Clean and scrub the perineum",
        "Draw bed curtains",
        "Place an underpad",
        "Position the patient",
    ),
    "Peripheral Venous Indwelled Needle Infusion and Maintaince": (
        "Connect infusion device",
        "Disinfect skin",
        "Flush the sealed tube",
        "Handwashing",
        "Remove needle",
        "Secure the indwelling needle",
        "Venipuncture",
    ),
    "Retention Enema": (
        "Check",
        "Handwashing",
        "Inject medication",
        "Insert rectal tube",
        "Organize the bed unit",
        "Place an underpad",
        "Position the patient",
        "Remove rectal tube",
    ),
    "Skin Preparation": ("Cleanse skin", "Handwashing", "Position the patient"),
    "Sputum Specimen Collection": ("Check", "Collect sputum specimen", "Handwashing", "Wear gloves"),
    "Stool Specimen Collection": ("Check", "Collect stool specimen", "Handwashing", "Wear gloves"),
    "Subcutaneous Injection": (
        "Aspirate medication",
        "Disinfect skin",
        "Handwashing",
        "Inject medication",
        "Perform subcutaneous puncture",
        "Release trapped air",
        "Remove needle",
    ),
    "Subcutaneous Injection Insulin": ("Disinfect skin", "Inject medication", "Prepare medication solution"),
    "Surgical Hand Scrub": (
        "Dry hands",
        "Perform seven-step handwashing technique",
        "Perform surgical hand disinfection",
        "Perform surgical hand scrub",
        "Rinse with running water",
    ),
    "Throat Swab Collection": ("Collect pharyngeal swab specimen", "Document"),
    "Transfer with Stretcher": ("Move and transfer", "Perform four-person transfer"),
    "Urine Specimen Collection": ("Check", "Collect urine specimen", "Handwashing"),
    "Use of Restraints": ("Immobilize the shoulder",),
    "Vital Sign Assessment": (
        "Check the blood pressure meter",
        "Check the thermometer",
        "Document",
        "Handwashing",
        "Measure blood pressure",
        "Measure body temperature",
        "Measure pulse",
        "Measure respiration",
    ),
    "Wheelchair Transfer Technique": ("Assist with bed rest", "Transport in wheelchair"),
}


def nurvid_procedure(question: str) -> str | None:
    """The NurViD procedure a question names: the first (in table order) whose name occurs
    in it, case-insensitively; None when none does."""
    lowered = question.lower()
    for procedure in NURVID_PROCEDURE_ACTIONS:
        if procedure.lower() in lowered:
            return procedure
    return None


def action_classes(data_source: str, procedure: str | None) -> tuple[str, ...]:
    """The official class list of a dataset (NurViD: of the procedure, or the sorted union
    of all its actions when the procedure is unknown); empty where the official evaluator
    has none (then the distinct ground truths are the classes)."""
    if data_source == "AVOS":
        return AVOS_ACTIONS
    if data_source == "CholecT50":
        return CHOLECT50_PHASES
    if data_source == "CoPESD":
        return COPESD_ACTIONS
    if data_source == "NurViD":
        if procedure in NURVID_PROCEDURE_ACTIONS:
            return NURVID_PROCEDURE_ACTIONS[procedure]
        return tuple(sorted({a for actions in NURVID_PROCEDURE_ACTIONS.values() for a in actions}))
    return ()


def normalize_action(text: str, data_source: str) -> str:
    """A label as the official evaluator compares it: stripped; old CoPESD names renamed."""
    text = text.strip()
    if data_source == "CoPESD":
        return COPESD_RENAMES.get(text, text)
    return text
